"""Quantile features Q_A, Q_B of the calibration rows (paper Sec. 4.1, Figure 2, Appendix A).

The random forest sees omega_A and omega_B as *quantiles within their repeat*: the pool of all
clients and layers of one round, exactly the pool the server bins at aggregation time
(:mod:`livar_merge.coefficients`). The quantile of a value is the inverse of numpy's linear
percentile, so that binning ranks with percentile edges ``p`` reproduces the server's binning of
values with cut points ``np.percentile(pool, p)`` (see :func:`pooled_percentile_rank`).

Rows: a DataFrame with one row per (repeat, client, layer) and at least the columns
``repeat_id, client, layer, omega_a, omega_b`` (and, downstream, ``num_samples``, ``lam``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd

KEY_COLUMNS = ("repeat_id", "client", "layer")
QUANTILE_COLUMNS = (("omega_a", "q_a"), ("omega_b", "q_b"))


def percentile_rank_1d(values: np.ndarray) -> np.ndarray:
    """Percentile (0-100) of each entry of a 1-D pool; see :func:`pooled_percentile_rank`."""
    from scipy.stats import rankdata

    pool = np.asarray(values, dtype=np.float64)
    if pool.ndim != 1:
        raise CalibrationError(f"expected a 1-D pool, got shape {pool.shape}")
    if pool.size == 0:
        return np.empty(0)
    if not np.all(np.isfinite(pool)):
        raise CalibrationError("pool holds NaN or Inf; quantiles are undefined")
    if pool.size == 1:
        return np.full(1, 50.0)
    position = rankdata(pool, method="average") - 1.0  # 0-based, ties get the mean position
    return 100.0 * position / (pool.size - 1)


def pooled_percentile_rank(values: np.ndarray) -> np.ndarray:
    """Quantile (0-100) of each value within the pool of all clients and layers ``[M, L]``.

    The ``i``-th smallest of ``n`` pooled values (0-based) gets ``100 i / (n - 1)``: the inverse
    of the piecewise-linear interpolation of ``np.percentile(pool, p, method="linear")``. Tied
    values get the mean of their positions; a pool of one value gets 50.

    Consistency with the server: for a value ``v`` not tied with another and any ``p``,
    ``v < np.percentile(pool, p)`` iff ``rank(v) < p`` (and likewise for ``=`` and ``>``), so
    ``assign_bins(values, np.percentile(pool, edges))`` equals ``assign_bins(ranks, edges)``.
    Exceptions: (1) a group of tied values at positions ``i..j`` whose span contains a cut,
    ``100 i/(n-1) <= p <= 100 j/(n-1)``: the server sees the group *on* the cut (middle bin),
    the rank puts it at its mean position, on one side; (2) floating point: when a cut lands
    exactly on a data point numpy's interpolation can return a value one ulp away (seen for
    ``p = 70``, ``n = 91``; never for ``p`` in {25, 50, 60, 80} up to ``n = 1200``).

    Returns float64 ``[M, L]`` (any shape: the pool is all entries).
    """
    array = np.asarray(values, dtype=np.float64)
    return percentile_rank_1d(array.reshape(-1)).reshape(array.shape)


def check_rows(rows: pd.DataFrame, columns: tuple[str, ...], *, where: str = "rows") -> None:
    """Raise :class:`CalibrationError` if ``columns`` are missing or keys are duplicated."""
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise CalibrationError(f"{where}: missing column(s) {missing}; have {list(rows.columns)}")
    keys = [c for c in KEY_COLUMNS if c in rows.columns]
    if len(keys) == len(KEY_COLUMNS):
        dup = rows.duplicated(subset=list(keys), keep=False)
        if dup.any():
            first = rows.loc[dup, keys].iloc[0].to_dict()
            raise CalibrationError(
                f"{where}: {int(dup.sum())} rows share a (repeat_id, client, layer) key, "
                f"e.g. {first}"
            )


def add_quantile_features(
    rows: pd.DataFrame, *, columns: tuple[tuple[str, str], ...] = QUANTILE_COLUMNS
) -> pd.DataFrame:
    """Copy of ``rows`` with ``q_a``, ``q_b``: percentile of omega_A / omega_B within its repeat.

    Each repeat's pool is all of its rows (every client and layer of that round), as on the
    server. ``columns`` maps source to feature column names.
    """
    sources = tuple(src for src, _ in columns)
    check_rows(rows, ("repeat_id", *sources))
    out = rows.copy()
    for src, dst in columns:
        values = out[src].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            first = out.loc[bad].iloc[0]
            raise CalibrationError(
                f"rows: column {src} has {int(bad.sum())} negative or non-finite values, first "
                f"at repeat {first['repeat_id']!r}: {first[src]!r}"
            )
        ranks = np.empty(len(out))
        for _, index in out.groupby("repeat_id", sort=False).indices.items():
            ranks[index] = percentile_rank_1d(values[index])
        out[dst] = ranks
    return out
