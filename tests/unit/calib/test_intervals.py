"""Held-out runs as the resampling unit, and the measured coverage of the shipped interval.

The coverage simulation draws synthetic calibrations with a known true effect: each run has a
run effect on the compared schemes' errors (shared by its rounds) plus round noise, and the
quality report's interval (:func:`livar_calib.quality.run_gap_difference` on the per-run means
of :func:`livar_calib.intervals.per_run`) must cover the true gap difference at least 93 % of
the time from :data:`MIN_HELDOUT_RUNS` held-out runs on. The old interval (a percentile
bootstrap that treats each round as independent) is simulated beside it and undercovers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livar_calib.forest import ForestSettings, cross_validated_r2, fit_forest
from livar_calib.intervals import (
    MIN_HELDOUT_RUNS,
    per_run,
    repeat_id,
    run_of,
    split_runs,
    t_interval,
)
from livar_calib.quality import FEDAVG, ORACLE, run_gap_difference
from livar_merge.errors import CalibrationError

TRUE_GAP_DIFFERENCE = 0.3
SIMULATIONS = 4000


def test_run_of_and_repeat_id():
    assert run_of("b0.1-s2-r3") == "b0.1-s2" and run_of(repeat_id("b1-s0", 12)) == "b1-s0"
    assert run_of("rep01") == "rep01"  # no round suffix: its own run
    assert run_of("b0.1-s2-rx") == "b0.1-s2-rx"


def test_split_holds_out_whole_runs():
    repeats = [repeat_id(f"b{b}-s{s}", r) for b in (0.1, 1) for s in range(4) for r in (1, 2, 3)]
    train, test, test_runs = split_runs(repeats, holdout_fraction=0.25, seed=0)
    assert len(test_runs) == 2  # round(0.25 * 8 runs)
    assert {run_of(r) for r in test} == set(test_runs)
    assert not {run_of(r) for r in train} & set(test_runs)
    assert len(test) == 6 and sorted(train + test) == sorted(repeats)
    assert split_runs(repeats, holdout_fraction=0.25, seed=0) == (train, test, test_runs)
    one_run = [repeat_id("b1-s0", r) for r in (1, 2)]
    assert split_runs(one_run, holdout_fraction=0.5, seed=0)[1] == []  # nothing to hold out
    with pytest.raises(CalibrationError, match="holdout_fraction"):
        split_runs(repeats, holdout_fraction=1.0, seed=0)


def test_forest_holds_out_runs_and_reports_r2_by_run():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    frames = []
    for s in range(6):
        for r in (1, 2):
            n = 40
            q_a, q_b = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
            lam = 0.2 + 0.002 * q_b - 0.001 * q_a + rng.normal(0, 0.02, n)
            frames.append(
                pd.DataFrame(
                    {"repeat_id": repeat_id(f"b1-s{s}", r), "q_a": q_a, "q_b": q_b, "lam": lam}
                )
            )
    rows = pd.concat(frames, ignore_index=True)
    result = fit_forest(
        rows, ForestSettings(n_estimators=20, min_samples_leaf=5), holdout_fraction=0.5
    )
    test_runs = {run_of(r) for r in result.test_repeats}
    assert len(test_runs) == 3 and len(result.test_repeats) == 6
    assert not test_runs & {run_of(r) for r in result.train_repeats}
    per_run_r2 = []
    for run in sorted(test_runs):
        sub = rows[rows["repeat_id"].map(run_of) == run]
        per_run_r2.append(r2_score(sub["lam"], result.predict(sub)))
    assert result.metrics["r2_by_run"] == pytest.approx(np.mean(per_run_r2))
    assert result.metrics["r2_by_run_low"] < np.mean(per_run_r2) < result.metrics["r2_by_run_high"]
    assert result.metrics["test_runs"] == 3


def test_t_interval_matches_scipy_and_needs_enough_units():
    from scipy import stats

    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 3))
    x[2, 1] = np.nan
    mean, low, high = t_interval(x, level=0.9)
    for k in range(3):
        col = x[:, k][np.isfinite(x[:, k])]
        expected = stats.t.interval(0.9, len(col) - 1, col.mean(), stats.sem(col))
        assert (mean[k], low[k], high[k]) == pytest.approx((col.mean(), *expected))
    _, low, high = t_interval(x[: MIN_HELDOUT_RUNS - 1])
    assert np.isnan(low).all() and np.isnan(high).all()


SCHEMES = (FEDAVG, ORACLE, "good", "bad")


def _simulate(rng: np.random.Generator, sims: int, runs: int, rounds: int, skewed: bool):
    """Per-repeat mean scaled errors ``[sims, runs, rounds, 4]`` (columns :data:`SCHEMES`) of
    synthetic calibrations: 'good' closes 0.6 and 'bad' 0.3 of the FedAvg-to-oracle gap on
    average (true difference 0.3), each with a run effect (normal, or a centred gamma(8):
    skewness 0.71; sd 0.15) shared by the run's rounds, and independent round noise."""
    shape = 8.0
    size = (sims, runs, 1, 2)
    if skewed:
        effect = 0.15 * (rng.gamma(shape, size=size) - shape) / np.sqrt(shape)
    else:
        effect = rng.normal(0.0, 0.15, size=size)
    fed = 0.9 + rng.normal(0.0, 0.01, (sims, runs, rounds))
    oracle = 0.8 + rng.normal(0.0, 0.01, (sims, runs, rounds))
    share = np.array([0.6, 0.3]) + effect + rng.normal(0.0, 0.05, (sims, runs, rounds, 2))
    closed = fed[..., None] - share * (fed - oracle)[..., None]
    return np.concatenate([fed[..., None], oracle[..., None], closed], axis=-1)


def _frame(errors: np.ndarray) -> pd.DataFrame:
    """One simulated calibration ``[runs, rounds, 4]`` as the report's per-repeat table."""
    runs, rounds, _ = errors.shape
    index = [repeat_id(f"b1-s{run}", r) for run in range(runs) for r in range(1, rounds + 1)]
    return pd.DataFrame(errors.reshape(runs * rounds, -1), index=index, columns=list(SCHEMES))


def _coverage(runs: int, skewed: bool, seed: int) -> float:
    """Coverage of the shipped interval: ``run_gap_difference`` on ``per_run`` means (checked
    on the first simulations), vectorised over the rest with the same ``t_interval``."""
    rng = np.random.default_rng(seed)
    errors = _simulate(rng, SIMULATIONS, runs, 2, skewed)
    run_means = errors.mean(axis=2)  # [sims, runs, 4]: the rounds of each run averaged
    span = run_means[..., 0].mean(axis=1) - run_means[..., 1].mean(axis=1)
    diff = (run_means[..., 3] - run_means[..., 2]) / span[:, None]  # bad - good, [sims, runs]
    mean, low, high = t_interval(diff.T)
    for k in range(20):  # the vectorised path is the shipped one
        shipped = run_gap_difference(per_run(_frame(errors[k])), "good", "bad")
        assert shipped == pytest.approx((mean[k], low[k], high[k], runs))
    return float(np.mean((low <= TRUE_GAP_DIFFERENCE) & (high >= TRUE_GAP_DIFFERENCE)))


@pytest.mark.parametrize("skewed", [False, True], ids=["normal", "gamma8"])
@pytest.mark.parametrize("runs", [MIN_HELDOUT_RUNS, 4, 6, 12])
def test_shipped_interval_covers_the_true_effect(runs, skewed):
    coverage = _coverage(runs, skewed, seed=runs + 100 * skewed)
    assert coverage >= 0.93, coverage


def test_round_bootstrap_undercovers():
    """The interval shipped before: a percentile bootstrap over rounds as if independent, at
    3 held-out runs of 2 rounds. Its coverage is far below 95 %."""
    rng = np.random.default_rng(7)
    sims = 1000
    errors = _simulate(rng, sims, 3, 2, skewed=False).reshape(sims, 6, 4)  # rounds as units
    span = errors[..., 0].mean(axis=1) - errors[..., 1].mean(axis=1)
    diff = (errors[..., 3] - errors[..., 2]) / span[:, None]
    draws = np.take_along_axis(diff[:, None, :], rng.integers(0, 6, (sims, 1000, 6)), axis=2)
    low, high = np.percentile(draws.mean(axis=2), [2.5, 97.5], axis=1)
    coverage = np.mean((low <= TRUE_GAP_DIFFERENCE) & (high >= TRUE_GAP_DIFFERENCE))
    assert coverage < 0.85, coverage


def test_cross_validated_r2_predicts_every_run_from_the_others():
    """Against a loop: each run predicted by a forest fitted on runs of other folds only."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(2)
    frames = []
    for s in range(8):
        n = 30
        q_a, q_b = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
        lam = 0.2 + 0.003 * q_b + rng.normal(0, 0.05, n) + rng.normal(0, 0.05)  # run effect
        frames.append(
            pd.DataFrame(
                {"repeat_id": repeat_id(f"b1-s{s}", 1), "q_a": q_a, "q_b": q_b, "lam": lam}
            )
        )
    rows = pd.concat(frames, ignore_index=True)
    got = cross_validated_r2(rows, ForestSettings(n_estimators=10, min_samples_leaf=5), folds=4)
    runs = rows["repeat_id"].map(run_of).to_numpy()
    x, y = rows[["q_a", "q_b"]].to_numpy(), rows["lam"].to_numpy()
    prediction = np.full(len(y), np.nan)
    for train, test in GroupKFold(n_splits=4).split(x, y, runs):
        assert not set(runs[train]) & set(runs[test])
        model = RandomForestRegressor(n_estimators=10, min_samples_leaf=5, random_state=0)
        prediction[test] = model.fit(x[train], y[train]).predict(x[test])
    assert got["cv_r2"] == pytest.approx(r2_score(y, prediction))
    per_run = [r2_score(y[runs == r], prediction[runs == r]) for r in sorted(set(runs))]
    assert got["cv_r2_by_run"] == pytest.approx(np.mean(per_run)) and got["cv_runs"] == 8
    assert got["cv_r2_by_run_low"] < got["cv_r2_by_run"] < got["cv_r2_by_run_high"]
