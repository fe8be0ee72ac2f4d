"""How well merging weights reconstruct the joint delta on the calibration repeats.

For each repeat, layer and weighting scheme ``w``, the relative error

    ||dW_joint^l - sum_m w_m^l dW_m^l||_F^2 / ||dW_joint^l||_F^2

is computed with the low-rank Gram identity (:func:`livar_calib.nnls.gram_objective`), never
forming a ``d x k`` matrix. Schemes: every given G_SHAP table (alpha of Eq. 5 from that repeat's
omegas, pooled over its clients and layers as on the server), FedAvg (``n_m / sum n``) and the
per-layer NNLS oracle (Eq. 4), which is a lower bound for any non-negative weights.

The raw error mixes two things: the *direction* of the weights (which client deltas, in which
proportions) and their *scale*. Sum-to-1 weights (a table's alpha, FedAvg) cannot match the
joint delta's scale (about M times a client's optimizer steps), so all of them score about the
same raw error. Each row therefore also holds the error after the scheme's best non-negative
per-layer scale, ``s* = max(0, w.h / w^T G w)`` (``scaled_error``: the direction quality), and
:func:`summarise_report` gives ``gap_closed``: the fraction of the FedAvg-to-oracle gap in mean
scaled error that a scheme closes (0: FedAvg, 1: the oracle), with a t interval over held-out
*runs* (a run's rounds and layers averaged first: :mod:`livar_calib.intervals`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from livar_calib.deltas import RepeatDeltas
from livar_calib.features import check_rows
from livar_calib.intervals import interval_text, per_run, t_interval, verdict_word
from livar_calib.nnls import DEFAULT_RANK_RTOL, gram_objective, nnls_gram, normal_equations
from livar_merge.coefficients import livar_coefficients
from livar_merge.errors import CalibrationError

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


def best_scale(weights: np.ndarray, gram: np.ndarray, h: np.ndarray) -> float:
    """``argmin_{s >= 0} ||dW_joint - s sum_m w_m dW_m||_F^2 = max(0, w.h / w^T G w)``."""
    w = np.asarray(weights, dtype=np.float64)
    curvature = float(w @ gram @ w)
    return max(float(w @ h) / curvature, 0.0) if curvature > 0 else 0.0


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

    Returns a DataFrame with columns ``repeat_id, layer, scheme, relative_error, residual_sq,
    scale, scaled_error`` (the errors are NaN for a layer whose joint delta is 0).
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
                scale = best_scale(w, gram, h)
                scaled = gram_objective(scale * w, gram, h, c)
                records.append(
                    {
                        "repeat_id": deltas.repeat_id,
                        "layer": layer,
                        "scheme": label,
                        "relative_error": residual / c if c > 0 else float("nan"),
                        "residual_sq": residual,
                        "scale": scale,
                        "scaled_error": scaled / c if c > 0 else float("nan"),
                    }
                )
    return pd.DataFrame.from_records(records)


def _per_run(report: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` per run and scheme ``[runs, schemes]``: per repeat over its layers
    (NaN rows dropped), then over the rounds of each run (:func:`livar_calib.intervals.per_run`)."""
    valid = report.loc[report[column].notna()]
    per_repeat = valid.pivot_table(
        index="repeat_id", columns="scheme", values=column, aggfunc="mean"
    )
    return per_run(per_repeat)


def _span(errors: pd.DataFrame) -> float:
    """The FedAvg-to-oracle gap in mean error (NaN when not positive)."""
    span = float(errors[FEDAVG].mean() - errors[ORACLE].mean())
    return span if span > 0 else float("nan")


def _gap(errors: pd.DataFrame) -> pd.Series:
    """Fraction of the FedAvg-to-oracle gap in mean error closed by each scheme."""
    means = errors.mean(axis=0)
    return (means[FEDAVG] - means) / _span(errors)


def summarise_report(report: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per scheme, best (lowest mean raw error) first: ``mean``, ``median``, ``count`` of the
    raw relative error, ``scaled_mean``/``scaled_median`` (after the best per-layer scale),
    ``gap_closed`` (scaled; 0 FedAvg, 1 oracle) with the ``level`` t interval over runs
    ``gap_low``/``gap_high`` of the per-run closed gap ``(e_fedavg - e_scheme) / span`` (the
    span held at its estimate; NaN below :data:`~livar_calib.intervals.MIN_HELDOUT_RUNS`
    runs), ``runs`` and ``gap_closed_raw`` (the same on raw errors)."""
    import pandas as pd

    check_rows(report, ("repeat_id", "scheme", "relative_error"), where="report")
    summary = report.groupby("scheme")["relative_error"].agg(["mean", "median", "count"])
    if "scaled_error" in report.columns and {FEDAVG, ORACLE} <= set(summary.index):
        scaled = report.groupby("scheme")["scaled_error"]
        summary["scaled_mean"], summary["scaled_median"] = scaled.mean(), scaled.median()
        errors = _per_run(report, "scaled_error")
        summary["gap_closed"] = _gap(errors)
        closed = errors.rsub(errors[FEDAVG], axis=0) / _span(errors)
        _, low, high = t_interval(closed.to_numpy(), level=level)
        summary["gap_low"] = pd.Series(low, index=errors.columns)
        summary["gap_high"] = pd.Series(high, index=errors.columns)
        summary["runs"] = errors.notna().sum(axis=0)
        summary["gap_closed_raw"] = _gap(_per_run(report, "relative_error"))
    return summary.sort_values("mean", kind="stable")


def gap_difference(
    report: pd.DataFrame, scheme: str, other: str, *, level: float = 0.95
) -> tuple[float, float, float, int]:
    """``gap_closed(scheme) - gap_closed(other)``, its t interval over runs (the per-run
    ``(e_other - e_scheme) / span``; NaN below the minimum number of runs) and the runs."""
    return run_gap_difference(_per_run(report, "scaled_error"), scheme, other, level=level)


def run_gap_difference(
    errors: pd.DataFrame, scheme: str, other: str, *, level: float = 0.95
) -> tuple[float, float, float, int]:
    """:func:`gap_difference` from per-run mean scaled errors ``[runs, schemes]``."""
    for name in (scheme, other, FEDAVG, ORACLE):
        if name not in errors.columns:
            raise CalibrationError(f"the report has no scheme {name!r}")
    per_run_diff = ((errors[other] - errors[scheme]) / _span(errors)).to_numpy()
    mean, low, high = t_interval(per_run_diff, level=level)
    return float(mean[0]), float(low[0]), float(high[0]), int(np.isfinite(per_run_diff).sum())


def verdict(report: pd.DataFrame, table: str, others: Sequence[str]) -> str:
    """One sentence per comparison: whether ``table`` closes more of the FedAvg-to-oracle gap
    (scaled error) than FedAvg and each of ``others``, by how much, and whether the 95 % t
    interval over held-out runs excludes 0; below the minimum number of held-out runs it says
    :data:`~livar_calib.intervals.TOO_FEW` instead of a verdict."""
    parts = []
    for other in (FEDAVG, *others):
        diff, low, high, runs = gap_difference(report, table, other)
        word = verdict_word(low, high)
        parts.append(
            f"{table} {word} {other}: gap closed {diff:+.3f}{interval_text(low, high, runs)}"
        )
    return "; ".join(parts)
