"""How well merging weights reconstruct the joint delta on the calibration repeats.

For each repeat, layer and weighting scheme ``w``, the relative error

    ||dW_joint^l - sum_m w_m^l dW_m^l||_F^2 / ||dW_joint^l||_F^2

is computed with the low-rank Gram identity (:func:`livar_calib.nnls.gram_objective`), never
forming a ``d x k`` matrix. Schemes: every given G_SHAP table (alpha of Eq. 5 from that repeat's
omegas, pooled over its clients and layers as on the server), FedAvg (``n_m / sum n``) and the
per-layer NNLS oracle (Eq. 4), which is a lower bound for any non-negative weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from livar_calib.deltas import CalibrationError, RepeatDeltas
from livar_calib.features import check_rows
from livar_calib.nnls import DEFAULT_RANK_RTOL, gram_objective, nnls_gram, normal_equations

if TYPE_CHECKING:
    import pandas as pd

    from livar_merge.tables import GShapTable

FEDAVG = "fedavg"
ORACLE = "nnls-oracle"


def _matrix(rows: pd.DataFrame, column: str, deltas: RepeatDeltas) -> np.ndarray:
    """``[clients, layers]`` matrix of ``column`` for one repeat, in the repeat's order."""
    table = rows.pivot(index="client", columns="layer", values=column)
    clients = [str(c) for c in deltas.clients]
    table.index = table.index.astype(str)
    missing = [
        (c, layer)
        for c in clients
        for layer in deltas.layers
        if c not in table.index or layer not in table.columns or np.isnan(table.at[c, layer])
    ]
    if missing:
        raise CalibrationError(
            f"rows of repeat {deltas.repeat_id!r} lack {column} for {len(missing)} "
            f"(client, layer) pairs, e.g. {missing[0]}"
        )
    return table.loc[clients, list(deltas.layers)].to_numpy(dtype=np.float64)


def scheme_weights(
    deltas: RepeatDeltas, rows: pd.DataFrame, tables: Mapping[str, GShapTable]
) -> dict[str, np.ndarray]:
    """Weights ``[clients, layers]`` of each table scheme and of FedAvg for one repeat."""
    from livar_merge.coefficients import livar_coefficients

    omega_a = _matrix(rows, "omega_a", deltas)
    omega_b = _matrix(rows, "omega_b", deltas)
    samples = _matrix(rows, "num_samples", deltas)
    if np.any(samples < 0) or np.any(samples.sum(axis=0) <= 0):
        raise CalibrationError(f"repeat {deltas.repeat_id!r}: num_samples must be >= 0, sum > 0")
    weights = {
        label: livar_coefficients(
            omega_a, omega_b, table, client_ids=deltas.clients, layer_names=deltas.layers
        )
        for label, table in tables.items()
    }
    weights[FEDAVG] = samples / samples.sum(axis=0, keepdims=True)
    return weights


def reconstruction_report(
    repeats: Sequence[RepeatDeltas],
    rows: pd.DataFrame,
    tables: Mapping[str, GShapTable],
    *,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> pd.DataFrame:
    """Relative reconstruction error per (repeat, layer, scheme).

    Args:
        repeats: the repeats' low-rank deltas.
        rows: one row per (repeat_id, client, layer) with ``omega_a, omega_b, num_samples``.
        tables: ``label -> GShapTable``; the label names the scheme (must differ from
            ``"fedavg"`` and ``"nnls-oracle"``).

    Returns a DataFrame with columns ``repeat_id, layer, scheme, relative_error, residual_sq``
    (``relative_error`` is NaN for a layer whose joint delta is 0).
    """
    import pandas as pd

    clash = {FEDAVG, ORACLE} & set(tables)
    if clash:
        raise CalibrationError(f"table labels {sorted(clash)} are reserved scheme names")
    check_rows(rows, ("repeat_id", "client", "layer", "omega_a", "omega_b", "num_samples"))
    by_repeat = {str(k): v for k, v in rows.groupby(rows["repeat_id"].astype(str), sort=False)}
    records = []
    for deltas in repeats:
        deltas.validate()
        sub = by_repeat.get(str(deltas.repeat_id))
        if sub is None:
            raise CalibrationError(f"rows hold no repeat {deltas.repeat_id!r}")
        weights = scheme_weights(deltas, sub, tables)
        for l, layer in enumerate(deltas.layers):
            gram, h, c = normal_equations(deltas.client_factors[layer], deltas.joint_factors[layer])
            layer_weights = {label: w[:, l] for label, w in weights.items()}
            layer_weights[ORACLE] = nnls_gram(gram, h, c, rank_rtol=rank_rtol).lam
            for label, w in layer_weights.items():
                residual = gram_objective(w, gram, h, c)
                records.append(
                    {
                        "repeat_id": deltas.repeat_id,
                        "layer": layer,
                        "scheme": label,
                        "relative_error": residual / c if c > 0 else float("nan"),
                        "residual_sq": residual,
                    }
                )
    return pd.DataFrame.from_records(records)


def summarise_report(report: pd.DataFrame) -> pd.DataFrame:
    """Mean, median and count of ``relative_error`` per scheme, best (lowest mean) first."""
    check_rows(report, ("scheme", "relative_error"), where="report")
    summary = report.groupby("scheme")["relative_error"].agg(["mean", "median", "count"])
    return summary.sort_values("mean", kind="stable")
