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
scaled error that a scheme closes (0: FedAvg, 1: the oracle), with a bootstrap interval over
the repeats (a repeat and all its layers resampled together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from livar_calib.deltas import RepeatDeltas
from livar_calib.features import check_rows
from livar_calib.nnls import DEFAULT_RANK_RTOL, gram_objective, nnls_gram, normal_equations
from livar_merge.coefficients import livar_coefficients
from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd

    from livar_merge.tables import GShapTable

FEDAVG = "fedavg"
ORACLE = "nnls-oracle"
BOOTSTRAP_RESAMPLES = 2000


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


def _per_repeat(report: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` per repeat and scheme ``[repeats, schemes]`` (NaN rows dropped)."""
    valid = report.loc[report[column].notna()]
    return valid.pivot_table(index="repeat_id", columns="scheme", values=column, aggfunc="mean")


def _gap(errors: pd.DataFrame) -> pd.Series:
    """Fraction of the FedAvg-to-oracle gap in mean error closed by each scheme."""
    means = errors.mean(axis=0)
    span = means[FEDAVG] - means[ORACLE]
    return (means[FEDAVG] - means) / span if span > 0 else means * np.nan


def bootstrap_interval(
    per_repeat: pd.DataFrame,
    statistic: Any,
    *,
    resamples: int,
    seed: int,
    level: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``statistic(per_repeat rows) -> [k]`` over repeats resampled
    with replacement (the same resamples for every scheme: paired)."""
    n = len(per_repeat)
    if n < 2:
        nan = np.full(len(statistic(per_repeat)), np.nan)
        return nan, nan
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [
            np.asarray(statistic(per_repeat.iloc[rng.integers(0, n, size=n)]), dtype=np.float64)
            for _ in range(resamples)
        ]
    )
    tail = (1.0 - level) / 2.0 * 100.0
    return np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100.0 - tail, axis=0)


def summarise_report(
    report: pd.DataFrame,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per scheme, best (lowest mean raw error) first: ``mean``, ``median``, ``count`` of the
    raw relative error, ``scaled_mean``/``scaled_median`` (after the best per-layer scale),
    ``gap_closed`` (scaled; 0 FedAvg, 1 oracle) with its ``level`` bootstrap interval
    ``gap_low``/``gap_high`` over repeats, and ``gap_closed_raw`` (the same on raw errors)."""
    import pandas as pd

    check_rows(report, ("repeat_id", "scheme", "relative_error"), where="report")
    summary = report.groupby("scheme")["relative_error"].agg(["mean", "median", "count"])
    if "scaled_error" in report.columns and {FEDAVG, ORACLE} <= set(summary.index):
        scaled = report.groupby("scheme")["scaled_error"]
        summary["scaled_mean"], summary["scaled_median"] = scaled.mean(), scaled.median()
        per_repeat = _per_repeat(report, "scaled_error")
        summary["gap_closed"] = _gap(per_repeat)
        low, high = bootstrap_interval(
            per_repeat, _gap, resamples=resamples, seed=seed, level=level
        )
        summary["gap_low"] = pd.Series(low, index=per_repeat.columns)
        summary["gap_high"] = pd.Series(high, index=per_repeat.columns)
        summary["gap_closed_raw"] = _gap(_per_repeat(report, "relative_error"))
    return summary.sort_values("mean", kind="stable")


def gap_difference(
    report: pd.DataFrame,
    scheme: str,
    other: str,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``gap_closed(scheme) - gap_closed(other)`` and its paired bootstrap interval."""
    per_repeat = _per_repeat(report, "scaled_error")
    for name in (scheme, other):
        if name not in per_repeat.columns:
            raise CalibrationError(f"the report has no scheme {name!r}")

    def difference(rows: pd.DataFrame) -> np.ndarray:
        gap = _gap(rows)
        return np.array([gap[scheme] - gap[other]])

    low, high = bootstrap_interval(
        per_repeat, difference, resamples=resamples, seed=seed, level=level
    )
    return float(difference(per_repeat)[0]), float(low[0]), float(high[0])


def verdict(report: pd.DataFrame, table: str, others: Sequence[str]) -> str:
    """One sentence per comparison: whether ``table`` closes more of the FedAvg-to-oracle gap
    (scaled error) than FedAvg and each of ``others``, by how much, and whether the 95 %
    bootstrap interval over held-out repeats excludes 0."""
    parts = []
    for other in (FEDAVG, *others):
        diff, low, high = gap_difference(report, table, other)
        if np.isnan(low):
            word = "cannot be told apart from (one held-out repeat: no interval)"
        elif low > 0:
            word = "beats"
        elif high < 0:
            word = "is worse than"
        else:
            word = "is within the noise of"
        interval = "" if np.isnan(low) else f" (95% interval {low:+.3f} to {high:+.3f})"
        parts.append(f"{table} {word} {other}: gap closed {diff:+.3f}{interval}")
    return "; ".join(parts)
