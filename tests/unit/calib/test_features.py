"""Pooled percentile ranks and the quantile features (livar_calib.features)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livar_calib.deltas import CalibrationError
from livar_calib.features import add_quantile_features, pooled_percentile_rank
from livar_merge.tables import assign_bins


# ------------------------------------------------------------------------------- features
def test_percentile_rank_basic():
    np.testing.assert_allclose(pooled_percentile_rank(np.array([[3.0, 1.0, 2.0]])), [[100, 0, 50]])
    np.testing.assert_allclose(pooled_percentile_rank(np.array([1.0, 1.0, 2.0])), [25, 25, 100])
    assert pooled_percentile_rank(np.array([[4.2]])).tolist() == [[50.0]]
    x = np.random.default_rng(1).lognormal(size=(5, 12))
    ranks = pooled_percentile_rank(x)  # the inverse of np.percentile at the data points
    np.testing.assert_allclose(np.percentile(x, ranks.ravel()), x.ravel(), rtol=1e-12)


PERCENTILES = {"A": np.array([25.0, 50.0]), "B": np.array([60.0, 80.0]), "single": np.array([50.0])}


@pytest.mark.parametrize("n", [2, 5, 21, 41, 60, 101, 480])
def test_percentile_rank_binning_matches_server(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        pool = rng.lognormal(size=n) * 10 ** rng.uniform(-4, 4)
        ranks = pooled_percentile_rank(pool)
        for edges in PERCENTILES.values():
            for p in (25.0, 50.0, 60.0, 80.0):
                cut = np.percentile(pool, p)
                assert np.array_equal(pool < cut, ranks < p) and np.array_equal(
                    pool == cut, ranks == p
                )
            cuts = np.percentile(pool, edges)
            np.testing.assert_array_equal(assign_bins(pool, cuts), assign_bins(ranks, edges))


@pytest.mark.parametrize("n", [10, 21, 60, 101])
def test_percentile_rank_binning_with_ties(n):
    """Ties: equal bins except for tie groups whose positions straddle a cut (documented)."""
    rng = np.random.default_rng(1000 + n)
    for _ in range(20):
        pool = rng.integers(0, max(2, n // 4), size=n).astype(float)
        ranks = pooled_percentile_rank(pool)
        order = np.sort(pool)
        first = np.searchsorted(order, pool, side="left")
        last = np.searchsorted(order, pool, side="right") - 1
        for edges in PERCENTILES.values():
            got = assign_bins(ranks, edges)
            expected = assign_bins(pool, np.percentile(pool, edges))
            straddles = np.zeros(n, dtype=bool)
            for p in edges:
                h = (n - 1) * p / 100.0
                straddles |= (first <= h) & (h <= last) & (first < last)
            np.testing.assert_array_equal(got[~straddles], expected[~straddles])
    all_equal = np.full(7, 3.0)  # the documented extreme: the server puts all in the middle bin
    assert assign_bins(all_equal, np.percentile(all_equal, [60, 80])).tolist() == [1] * 7
    assert assign_bins(pooled_percentile_rank(all_equal), [60, 80]).tolist() == [0] * 7


def test_add_quantile_features_pools_per_repeat():
    rows = pd.DataFrame(
        {
            "repeat_id": ["r1"] * 4 + ["r2"] * 3,
            "client": ["a", "a", "b", "b", "a", "b", "c"],
            "layer": ["x", "y", "x", "y", "x", "x", "x"],
            "omega_a": [4.0, 1.0, 3.0, 2.0, 10.0, 30.0, 20.0],
            "omega_b": [1.0, 1.0, 1.0, 5.0, 0.0, 0.0, 0.0],
        }
    )
    out = add_quantile_features(rows)
    assert "q_a" not in rows.columns
    np.testing.assert_allclose(out["q_a"], [100, 0, 200 / 3, 100 / 3, 0, 100, 50])
    np.testing.assert_allclose(out["q_b"], [100 / 3, 100 / 3, 100 / 3, 100, 50, 50, 50])
    with pytest.raises(CalibrationError, match="share a"):
        add_quantile_features(pd.concat([rows, rows.iloc[:1]]))
    with pytest.raises(CalibrationError, match="omega_a"):
        add_quantile_features(rows.assign(omega_a=[-1.0, 1, 1, 1, 1, 1, 1]))
