"""Discretisation rules on a planted non-additive table, and the informative quality report.

The planted table is the paper's Table A (flat across Q_A in the Q_B < 60 row). Its best
additive approximation misses some cell by 0.025 (minimax, computed here by linear
programming), so the ``additive`` rule provably cannot reproduce it; ``interaction`` and
``cell-mean`` must come within 0.01 of every cell (measured: about 0.002).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linprog, minimize_scalar
from sklearn.ensemble import RandomForestRegressor

from livar_calib.deltas import CalibrationError
from livar_calib.discretise import RULES, build_table, discretise_shap
from livar_calib.explain import shap_analysis
from livar_calib.quality import (
    FEDAVG,
    ORACLE,
    best_scale,
    gap_difference,
    summarise_report,
    verdict,
)
from livar_merge.tables import GShapTable, assign_bins

TABLE_A = GShapTable.load("paper-table-a")
RECOVERY_TOL = 0.01  # max cell error of interaction / cell-mean on the planted table


def minimax_additive_error(values: np.ndarray) -> float:
    """``min over u, v of max_{b,a} |V[b, a] - u_b - v_a|`` by linear programming."""
    n_b, n_a = values.shape
    a_ub, b_ub = [], []
    for b in range(n_b):
        for a in range(n_a):
            row = np.zeros(n_b + n_a + 1)
            row[b], row[n_b + a], row[-1] = 1.0, 1.0, -1.0
            a_ub.append(row)
            b_ub.append(values[b, a])
            mirrored = -row
            mirrored[-1] = -1.0
            a_ub.append(mirrored)
            b_ub.append(-values[b, a])
    cost = np.zeros(n_b + n_a + 1)
    cost[-1] = 1.0
    bounds = [(None, None)] * (n_b + n_a) + [(0, None)]
    result = linprog(cost, A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=bounds)
    assert result.success
    return float(result.fun)


@pytest.fixture(scope="module")
def planted():
    """Rows whose target is Table A's cell of their (q_a, q_b), plus noise and an irrelevant
    sample-count feature; a forest and its SHAP (and interaction) values."""
    rng = np.random.default_rng(0)
    n = 1500
    q_a, q_b = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
    cells = TABLE_A.values[
        assign_bins(q_b, np.asarray(TABLE_A.edges_b)), assign_bins(q_a, np.asarray(TABLE_A.edges_a))
    ]
    rows = pd.DataFrame({"q_a": q_a, "q_b": q_b, "num_samples": rng.integers(50, 500, n)})
    forest = RandomForestRegressor(60, min_samples_leaf=20, random_state=0)
    forest.fit(rows, cells + rng.normal(0.0, 0.01, n))
    return rows, shap_analysis(forest, rows, interactions=True)


def test_table_a_is_not_additive():
    assert minimax_additive_error(TABLE_A.values) == pytest.approx(0.025, abs=1e-9)
    additive = np.add.outer([0.0, 1.0, 3.0], [0.5, 0.2, 0.1])
    assert minimax_additive_error(additive) == pytest.approx(0.0, abs=1e-9)


def test_interaction_and_cell_mean_recover_the_planted_table(planted):
    rows, explained = planted
    bound = minimax_additive_error(TABLE_A.values)
    errors = {
        rule: np.abs(discretise_shap(explained, rows, rule=rule).values - TABLE_A.values).max()
        for rule in RULES
    }
    assert errors["interaction"] < RECOVERY_TOL, errors
    assert errors["cell-mean"] < RECOVERY_TOL, errors
    # the additive rule's table is additive, so it misses by at least the minimax bound
    additive = discretise_shap(explained, rows, rule="additive")
    v = additive.raw
    np.testing.assert_allclose(v - v[:, :1] - v[:1, :] + v[0, 0], 0.0, atol=1e-12)
    assert errors["additive"] >= bound - 1e-12 > 2 * RECOVERY_TOL
    # the low-Q_B row is flat across Q_A only without the additive restriction
    for rule in ("interaction", "cell-mean"):
        low_row = discretise_shap(explained, rows, rule=rule).values[0]
        assert np.ptp(low_row) < RECOVERY_TOL, (rule, low_row)
    assert np.ptp(additive.values[0]) > 0.01


def test_cell_mean_is_the_mean_prediction_per_cell(planted):
    rows, explained = planted
    result = discretise_shap(explained, rows, rule="cell-mean")
    prediction = explained.prediction()
    bin_a = assign_bins(rows["q_a"].to_numpy(), np.asarray(TABLE_A.edges_a))
    bin_b = assign_bins(rows["q_b"].to_numpy(), np.asarray(TABLE_A.edges_b))
    for b in range(3):
        for a in range(3):
            mask = (bin_b == b) & (bin_a == a)
            assert result.counts[b, a] == mask.sum()
            assert result.raw[b, a] == pytest.approx(prediction[mask].mean(), abs=1e-12)


def test_interaction_rule_by_hand(planted):
    """Brute-force loop over rows: main effects per bin, the pair term per cell, the rest as a
    constant."""
    rows, explained = planted
    phi = explained.interactions
    np.testing.assert_allclose(phi.sum(axis=2), explained.values.to_numpy(), atol=1e-6)
    result = discretise_shap(explained, rows, rule="interaction")
    bin_a = assign_bins(rows["q_a"].to_numpy(), np.asarray(TABLE_A.edges_a))
    bin_b = assign_bins(rows["q_b"].to_numpy(), np.asarray(TABLE_A.edges_b))
    rest = phi.sum(axis=(1, 2)) - phi[:, 0, 0] - phi[:, 1, 1] - phi[:, 0, 1] - phi[:, 1, 0]
    for b in range(3):
        for a in range(3):
            cell = (bin_b == b) & (bin_a == a)
            expected = (
                explained.base_value
                + phi[bin_a == a, 0, 0].mean()
                + phi[bin_b == b, 1, 1].mean()
                + (phi[cell, 0, 1] + phi[cell, 1, 0]).mean()
                + rest.mean()
            )
            assert result.raw[b, a] == pytest.approx(expected, abs=1e-9)


def test_empty_cells_are_filled_and_reported(planted):
    rows, explained = planted
    keep = ~((rows["q_b"] > 80) & (rows["q_a"] < 25)).to_numpy()
    sub_rows = rows.loc[keep].reset_index(drop=True)
    sub = shap_analysis_subset(explained, keep)
    result = discretise_shap(sub, sub_rows, rule="cell-mean")
    assert result.counts[2, 0] == 0
    assert result.empty_cells == [{"b": 2, "a": 0, "filled_with": "additive"}]
    additive = discretise_shap(sub, sub_rows, rule="additive")
    assert result.raw[2, 0] == pytest.approx(additive.raw[2, 0])


def shap_analysis_subset(explained, keep):
    from dataclasses import replace

    return replace(
        explained,
        values=explained.values.loc[keep].reset_index(drop=True),
        data=explained.data.loc[keep].reset_index(drop=True),
        interactions=explained.interactions[keep],
    )


def test_rule_errors_and_provenance(planted, tmp_path):
    rows, explained = planted
    with pytest.raises(CalibrationError, match="unknown discretisation rule 'median'"):
        discretise_shap(explained, rows, rule="median")
    from dataclasses import replace

    with pytest.raises(CalibrationError, match="needs SHAP interaction values"):
        discretise_shap(replace(explained, interactions=None), rows, rule="interaction")
    table, _ = build_table(explained, rows, name="planted", out_dir=tmp_path, rule="interaction")
    report = table.provenance["discretisation"]
    assert report["rule_name"] == "interaction" and report["rule"] == RULES["interaction"]
    assert np.asarray(report["rows_per_cell"]).sum() == len(rows)
    assert "interaction" in table.description


# ------------------------------------------------------------------------ quality report
def test_best_scale_matches_a_dense_search(rng):
    m, d = 4, 30
    deltas = rng.normal(size=(m, d))
    joint = rng.normal(size=d) + 3.0 * deltas.sum(axis=0)
    gram, h = deltas @ deltas.T, deltas @ joint
    w = rng.uniform(0.1, 1.0, size=m)
    w /= w.sum()
    dense = minimize_scalar(
        lambda t: float(np.sum((joint - t * (w @ deltas)) ** 2)),
        bounds=(0.0, 100.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert best_scale(w, gram, h) == pytest.approx(dense.x, rel=1e-6)
    assert best_scale(w, gram, -h) == 0.0  # pointing away: the best non-negative scale is 0


def synthetic_report(rng, n_runs=6, rounds=2, layers=4, run_sd=0.05):
    """A report of ``n_runs`` runs of ``rounds`` rounds where scheme 'good' sits 80 % and 'bad'
    20 % of the way from FedAvg to the oracle, each plus a run effect shared by the run's rounds
    (sd ``run_sd`` of the gap) and round noise."""
    records = []
    for run in range(n_runs):
        effect = {"good": rng.normal(0, run_sd), "bad": rng.normal(0, run_sd)}
        for r in range(1, rounds + 1):
            for layer in range(layers):
                fed, oracle = 0.5 + rng.uniform(0, 0.1), 0.05 + rng.uniform(0, 0.01)
                for scheme, share in ((FEDAVG, 0.0), (ORACLE, 1.0), ("good", 0.8), ("bad", 0.2)):
                    if scheme in effect:
                        share += effect[scheme] + rng.normal(0, 0.01)
                    err = fed - share * (fed - oracle)
                    records.append(
                        {
                            "repeat_id": f"b0.5-s{run}-r{r}",
                            "layer": f"l{layer}",
                            "scheme": scheme,
                            "relative_error": err + 0.3,
                            "scaled_error": err,
                        }
                    )
    return pd.DataFrame.from_records(records)


def per_run_by_loop(report, column="scaled_error"):
    """``{run: {scheme: mean}}``: layers then rounds averaged, by explicit loops."""
    out = {}
    for run in sorted({rid.rsplit("-r", 1)[0] for rid in report["repeat_id"]}):
        out[run] = {}
        for scheme in sorted(set(report["scheme"])):
            round_means = []
            for rid in sorted(set(report["repeat_id"])):
                if rid.rsplit("-r", 1)[0] != run:
                    continue
                sel = report[(report["repeat_id"] == rid) & (report["scheme"] == scheme)]
                round_means.append(sel[column].mean())
            out[run][scheme] = float(np.mean(round_means))
    return out


def test_gap_closed_and_t_interval_by_hand(rng):
    """gap_closed, its interval and gap_difference against loops and scipy's t interval over
    whole runs (not rounds)."""
    from scipy import stats

    report = synthetic_report(rng)
    summary = summarise_report(report)
    runs = per_run_by_loop(report)
    fed = np.array([v[FEDAVG] for v in runs.values()])
    oracle = np.array([v[ORACLE] for v in runs.values()])
    good = np.array([v["good"] for v in runs.values()])
    bad = np.array([v["bad"] for v in runs.values()])
    span = fed.mean() - oracle.mean()
    assert summary.loc["good", "gap_closed"] == pytest.approx((fed.mean() - good.mean()) / span)
    assert summary.loc[FEDAVG, "gap_closed"] == 0.0 and summary.loc[ORACLE, "gap_closed"] == 1.0
    closed = (fed - good) / span
    low, high = stats.t.interval(0.95, len(closed) - 1, closed.mean(), stats.sem(closed))
    assert summary.loc["good", ["gap_low", "gap_high"]].tolist() == pytest.approx([low, high])
    assert summary.loc["good", "runs"] == 6
    diff, d_low, d_high, n = gap_difference(report, "good", "bad")
    per_run_diff = (bad - good) / span
    expected = stats.t.interval(0.95, 5, per_run_diff.mean(), stats.sem(per_run_diff))
    assert (diff, d_low, d_high, n) == pytest.approx((per_run_diff.mean(), *expected, 6))
    assert diff == pytest.approx(
        summary.loc["good", "gap_closed"] - summary.loc["bad", "gap_closed"]
    )


def test_verdict_words_follow_the_interval(rng):
    report = synthetic_report(rng, n_runs=8, run_sd=0.02)
    text = verdict(report, "good", ["bad"])
    assert text.startswith("good beats fedavg") and "good beats bad" in text
    assert "8 held-out runs" in text
    assert "bad is worse than good" in verdict(report, "bad", ["good"])
    # 'good' against itself relabelled: a zero true difference is within the noise
    twin = report.loc[report["scheme"] == "good"].assign(scheme="twin")
    twin["scaled_error"] += np.random.default_rng(1).normal(0, 0.002, len(twin))
    both = pd.concat([report, twin], ignore_index=True)
    assert "good is within the noise of twin" in verdict(both, "good", ["twin"])


def test_too_few_held_out_runs_give_no_verdict(rng):
    """Two runs of many rounds: plenty of repeats, but too few independent units."""
    from livar_calib.intervals import MIN_HELDOUT_RUNS, TOO_FEW

    report = synthetic_report(rng, n_runs=MIN_HELDOUT_RUNS - 1, rounds=6)
    summary = summarise_report(report)
    assert np.isnan(summary.loc["good", "gap_low"]) and np.isnan(summary.loc["good", "gap_high"])
    text = verdict(report, "good", ["bad"])
    assert TOO_FEW in text
    assert "beats" not in text and "worse" not in text and "within the noise" not in text
    enough = synthetic_report(rng, n_runs=MIN_HELDOUT_RUNS, rounds=1)
    assert TOO_FEW not in verdict(enough, "good", ["bad"])


# ------------------------------------------------------- correlated features, shrinkage
def correlated_planted(rho: float, n: int = 1500, seed: int = 0):
    """Table A planted on quantile features with a Gaussian copula of correlation ``rho`` (the
    calibration's omega_A and omega_B quantiles are strongly correlated), noise sd 0.01."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], n)
    rows = pd.DataFrame({"q_a": 100 * norm.cdf(z[:, 0]), "q_b": 100 * norm.cdf(z[:, 1])})
    cells = TABLE_A.values[
        assign_bins(rows["q_b"].to_numpy(), np.asarray(TABLE_A.edges_b)),
        assign_bins(rows["q_a"].to_numpy(), np.asarray(TABLE_A.edges_a)),
    ]
    forest = RandomForestRegressor(60, min_samples_leaf=20, random_state=0)
    forest.fit(rows, cells + rng.normal(0.0, 0.01, n))
    return rows, shap_analysis(forest, rows, interactions=True)


@pytest.mark.parametrize("rho", [0.8, -0.8])
def test_correlated_features_cell_mean_and_interaction_tie_but_thin_cells_are_not_recovered(rho):
    """What the docs' "cell-mean and interaction tie" claim holds to: on correlated features
    the two rules still agree with each other in every cell, and recover every cell with 50 or
    more rows, but a corner cell with a handful of rows (independence would give ~135-225) is
    not recovered by either: the forest has barely seen it."""
    rows, explained = correlated_planted(rho)
    cell_mean = discretise_shap(explained, rows, rule="cell-mean")
    interaction = discretise_shap(explained, rows, rule="interaction")
    assert np.abs(cell_mean.values - interaction.values).max() < 0.005
    error = np.abs(cell_mean.values - TABLE_A.values)
    thick = cell_mean.counts >= 50
    assert error[thick].max() < 0.02, error
    thinnest = np.unravel_index(np.argmin(cell_mean.counts), cell_mean.counts.shape)
    assert cell_mean.counts[thinnest] < 15  # correlation empties a corner
    assert error[thinnest] > 0.01 or error.max() > 0.05, error  # missed there or nearby


@pytest.mark.parametrize("rule", ["cell-mean", "interaction"])
def test_thin_cells_are_shrunk_to_the_additive_value_by_the_stated_rule(rule):
    """The prior: the additive rule's cell for ``cell-mean``; for ``interaction`` its own
    main-effects part (the cell without the (q_a, q_b) interaction term)."""
    rows, explained = correlated_planted(-0.8)
    plain = discretise_shap(explained, rows, rule=rule)
    prior = (
        discretise_shap(explained, rows, rule="additive").raw
        if rule == "cell-mean"
        else plain.raw - plain.interaction
    )
    shrunk = discretise_shap(explained, rows, rule=rule, min_cell_rows=50)
    for b in range(3):
        for a in range(3):
            n = int(plain.counts[b, a])
            weight = min(1.0, n / 50)
            expected = prior[b, a] + weight * (plain.raw[b, a] - prior[b, a])
            assert shrunk.raw[b, a] == pytest.approx(expected, abs=1e-12), (b, a, n)
    assert (plain.counts < 50).any() and (plain.counts >= 50).any()
    report = shrunk.report()["shrinkage"]
    assert report["min_cell_rows"] == 50
    np.testing.assert_allclose(report["weight_per_cell"], np.minimum(1, plain.counts / 50))
    np.testing.assert_allclose(report["unshrunk_cells"], plain.raw)
    # the additive rule is the prior itself: nothing to shrink
    additive = discretise_shap(explained, rows, rule="additive")
    np.testing.assert_array_equal(
        discretise_shap(explained, rows, rule="additive", min_cell_rows=50).raw, additive.raw
    )


def test_cell_intervals_resample_whole_runs(tmp_path):
    """Per-cell intervals: each resample draws whole runs; checked against a brute-force
    bootstrap loop over the same draws, and written into the table's provenance."""
    from livar_calib.discretise import cell_intervals

    rows, explained = correlated_planted(0.5, n=600)
    runs = np.repeat([f"b1-s{k}" for k in range(6)], 100)
    result = discretise_shap(explained, rows, rule="cell-mean", min_cell_rows=20)
    with_ci = cell_intervals(explained, rows, result, runs=runs, resamples=50, seed=3)
    rng = np.random.default_rng(3)
    draws = []
    for _ in range(50):
        chosen = rng.integers(0, 6, 6)
        index = np.concatenate([np.flatnonzero(runs == f"b1-s{k}") for k in chosen])
        sub_rows = rows.iloc[index].reset_index(drop=True)
        sub = type(explained)(
            values=explained.values.iloc[index].reset_index(drop=True),
            base_value=explained.base_value,
            feature_names=explained.feature_names,
            data=explained.data.iloc[index].reset_index(drop=True),
            interactions=explained.interactions[index],
        )
        draws.append(discretise_shap(sub, sub_rows, rule="cell-mean", min_cell_rows=20).values)
    low, high = np.percentile(np.stack(draws), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(with_ci.cell_low, low)
    np.testing.assert_allclose(with_ci.cell_high, high)
    assert (with_ci.cell_low <= result.values + 1e-12).all()
    assert (result.values <= with_ci.cell_high + 1e-12).all()
    table, _ = build_table(
        explained, rows, name="ci", out_dir=tmp_path, min_cell_rows=20, runs=runs, resamples=50
    )
    interval = table.provenance["discretisation"]["cell_interval"]
    assert (
        interval["runs"] == 6 and interval["resamples"] == 50 and "bootstrap" in interval["method"]
    )
    assert np.asarray(interval["low"]).shape == (3, 3)


def _path_dependent_value(tree, x: np.ndarray, known: set[int]) -> float:
    """E[tree(x) | x_known] under the trees' own cover (TreeSHAP's path-dependent expectation):
    at a split on a known feature follow x, else average both children by their (bootstrap-
    weighted) training samples."""

    def walk(node: int) -> float:
        left, right = tree.children_left[node], tree.children_right[node]
        if left == -1:
            return float(tree.value[node].ravel()[0])
        feature = tree.feature[node]
        if feature in known:
            return walk(left if x[feature] <= tree.threshold[node] else right)
        n_left = tree.weighted_n_node_samples[left]
        n_right = tree.weighted_n_node_samples[right]
        return (n_left * walk(left) + n_right * walk(right)) / (n_left + n_right)

    return walk(0)


def test_interaction_values_equal_brute_force_shapley_interactions():
    """SHAP interaction values of a small two-feature forest against the Shapley interaction
    index by brute force (v(S) by walking every tree; two players: Phi_ab = Phi_ba =
    (v(ab) - v(a) - v(b) + v()) / 2, main effect phi_a - Phi_ab); the interaction rule's
    cells then follow from these values (previous test)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 100, (400, 2))
    y = TABLE_A.values[
        assign_bins(x[:, 1], np.asarray(TABLE_A.edges_b)),
        assign_bins(x[:, 0], np.asarray(TABLE_A.edges_a)),
    ] + rng.normal(0, 0.01, 400)
    frame = pd.DataFrame(x, columns=["q_a", "q_b"])
    forest = RandomForestRegressor(5, max_depth=4, random_state=0).fit(frame, y)
    explained = shap_analysis(forest, frame.iloc[:40], interactions=True)
    trees = [est.tree_ for est in forest.estimators_]
    for i in range(40):
        point = x[i]
        v = {
            key: np.mean([_path_dependent_value(t, point, set(key)) for t in trees])
            for key in [(), (0,), (1,), (0, 1)]
        }
        pair = (v[(0, 1)] - v[(0,)] - v[(1,)] + v[()]) / 2
        shapley_a = ((v[(0,)] - v[()]) + (v[(0, 1)] - v[(1,)])) / 2
        shapley_b = ((v[(1,)] - v[()]) + (v[(0, 1)] - v[(0,)])) / 2
        expected = np.array([[shapley_a - pair, pair], [pair, shapley_b - pair]])
        np.testing.assert_allclose(explained.interactions[i], expected, atol=1e-9)
        assert explained.base_value == pytest.approx(v[()], abs=1e-9)
