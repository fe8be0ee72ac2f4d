"""The calibration core on a planted relation, in memory: NNLS, features, the forest
(livar_calib.forest), SHAP (livar_calib.explain), Figure 2 (livar_calib.figures), the table and
its reconstruction quality (livar_calib.quality)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livar_calib.deltas import CalibrationError, RepeatDeltas
from livar_calib.discretise import build_table
from livar_calib.explain import shap_analysis
from livar_calib.features import add_quantile_features, pooled_percentile_rank
from livar_calib.figures import plot_shap_summary
from livar_calib.forest import WITH_SAMPLES, ForestSettings, fit_forest
from livar_calib.nnls import (
    nnls_repeat,
)
from livar_calib.quality import reconstruction_report, summarise_report
from livar_merge.tables import GShapTable
from tests.helpers import factors

# ------------------------------------------------------------------ planted relation (E2E)
N_REPEATS, N_CLIENTS, N_LAYERS = 30, 5, 12


def planted_repeats(seed: int = 0) -> tuple[list[RepeatDeltas], pd.DataFrame]:
    """Repeats where lambda* rises with Q_B and falls with Q_A: 0.16 + 0.3 q_b - 0.15 q_a."""
    rng = np.random.default_rng(seed)
    repeats, frames = [], []
    clients = [f"c{m}" for m in range(N_CLIENTS)]
    layers = [f"blocks.{i // 4}.{['qkv', 'proj', 'fc1', 'fc2'][i % 4]}" for i in range(N_LAYERS)]
    for r in range(N_REPEATS):
        rid = f"rep{r:02d}"
        layer_scale = rng.normal(0.0, 1.0, size=(2, 1, N_LAYERS))
        omega_a = np.exp(rng.normal(size=(N_CLIENTS, N_LAYERS)) + layer_scale[0])
        omega_b = np.exp(rng.normal(size=(N_CLIENTS, N_LAYERS)) + layer_scale[1])
        qa, qb = pooled_percentile_rank(omega_a) / 100, pooled_percentile_rank(omega_b) / 100
        lam_star = 0.16 + 0.3 * qb - 0.15 * qa
        samples = rng.integers(50, 500, size=N_CLIENTS)
        client_factors, joint_factors = {}, {}
        for l, layer in enumerate(layers):
            d, k = (int(x) for x in rng.integers(16, 25, size=2))
            fs = [factors(rng, d, k, int(rng.integers(2, 4))) for _ in range(N_CLIENTS)]
            noise = factors(rng, d, k, 1)
            client_factors[layer] = fs
            joint_factors[layer] = (
                np.concatenate(
                    [lam_star[m, l] * fs[m][0] for m in range(N_CLIENTS)] + [0.02 * noise[0]], 1
                ),
                np.concatenate([f[1] for f in fs] + [noise[1]], 0),
            )
        repeats.append(RepeatDeltas(rid, layers, clients, client_factors, joint_factors))
        frames.append(
            pd.DataFrame(
                {
                    "repeat_id": rid,
                    "client": np.repeat(clients, N_LAYERS),
                    "layer": np.tile(layers, N_CLIENTS),
                    "omega_a": omega_a.ravel(),
                    "omega_b": omega_b.ravel(),
                    "num_samples": np.repeat(samples, N_LAYERS),
                    "lam_star": lam_star.ravel(),
                }
            )
        )
    return repeats, pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def planted():
    repeats, rows = planted_repeats()
    lam = pd.concat([nnls_repeat(d) for d in repeats], ignore_index=True)
    rows = rows.merge(lam, on=["repeat_id", "client", "layer"], validate="one_to_one")
    rows = add_quantile_features(rows)
    forest = fit_forest(rows, ForestSettings(0, n_estimators=60, min_samples_leaf=20, n_jobs=2))
    explained = shap_analysis(forest, rows.loc[:, list(forest.features)])
    return {"repeats": repeats, "rows": rows, "forest": forest, "shap": explained}


def test_planted_relation_is_recovered(planted, tmp_path):
    rows, forest, explained = planted["rows"], planted["forest"], planted["shap"]
    # NNLS recovers the planted coefficients; the forest beats a constant on held-out repeats
    assert np.abs(rows["lam"] - rows["lam_star"]).max() < 0.05
    assert forest.metrics["r2"] > 0.8 > forest.metrics["r2_constant"]
    assert forest.metrics["mae"] < 0.5 * forest.metrics["mae_constant"]
    np.testing.assert_allclose(
        explained.prediction(), forest.model.predict(rows.loc[:, ["q_a", "q_b"]]), atol=1e-6
    )
    table, path = build_table(
        explained, rows, name="planted", out_dir=tmp_path, provenance={"proxy_dataset": "synthetic"}
    )
    assert path == tmp_path / "planted.v1.json" and GShapTable.load(path) == table
    v = table.values  # [Q_B bin, Q_A bin]
    assert np.all(np.diff(v, axis=0) >= 0), f"not non-decreasing along Q_B:\n{v}"
    assert np.all(np.diff(v, axis=1) <= 0), f"not non-increasing along Q_A:\n{v}"
    assert np.all(v[-1, :] > v[0, :]) and np.all(v[:, 0] > v[:, -1])
    assert v[-1, 0] == v.max() and v[0, -1] == v.min()
    assert table.provenance["discretisation"]["clipped_cells"] == []
    # reconstruction on the held-out repeats: oracle < new table < FedAvg
    held_out = [d for d in planted["repeats"] if d.repeat_id in forest.test_repeats]
    report = reconstruction_report(
        held_out, rows, {"planted": table, "paper": GShapTable.load("paper-table-a")}
    )
    assert len(report) == len(held_out) * N_LAYERS * 4
    summary = summarise_report(report)
    assert summary.index[0] == "nnls-oracle"
    assert summary.loc["planted", "mean"] < summary.loc["fedavg", "mean"]
    assert summary.loc["planted", "median"] < summary.loc["fedavg", "median"]
    per_layer = report.pivot_table(
        index=["repeat_id", "layer"], columns="scheme", values="relative_error"
    )
    assert (
        per_layer["nnls-oracle"] <= per_layer.drop(columns="nnls-oracle").min(axis=1) + 1e-12
    ).all()


def test_forest_holds_out_whole_repeats(planted):
    rows = planted["rows"]
    result = fit_forest(rows, ForestSettings(3, n_estimators=10), holdout_fraction=0.25)
    train, test = set(result.train_repeats), set(result.test_repeats)
    assert not train & test and train | test == set(rows["repeat_id"])
    assert len(test) == round(0.25 * N_REPEATS)
    assert result.metrics["n_test"] == len(test) * N_CLIENTS * N_LAYERS
    assert result.model.n_features_in_ == 2
    chosen = fit_forest(rows, ForestSettings(n_estimators=5), holdout_repeats=["rep01", "rep02"])
    assert chosen.test_repeats == ["rep01", "rep02"] and len(chosen.train_repeats) == N_REPEATS - 2
    everything = fit_forest(rows, ForestSettings(n_estimators=5), holdout_repeats=[])
    assert everything.test_repeats == [] and np.isnan(everything.metrics["r2"])
    with pytest.raises(CalibrationError, match="not in rows"):
        fit_forest(rows, ForestSettings(n_estimators=5), holdout_repeats=["nope"])
    samples = fit_forest(rows, ForestSettings(1, n_estimators=5), features=WITH_SAMPLES)
    assert samples.model.feature_names_in_.tolist() == ["q_a", "q_b", "num_samples"]


def test_shap_summary_figure(planted, tmp_path):
    rows, explained = planted["rows"], planted["shap"]
    fig = plot_shap_summary(explained, rows, tmp_path / "figs" / "figure2")
    assert fig.png.stat().st_size > 1000 and fig.pdf.stat().st_size > 1000
    assert fig.png.suffix == ".png" and fig.pdf.suffix == ".pdf"
    assert set(fig.points) == {"q_a", "q_b"}
    for feature in ("q_a", "q_b"):
        assert len(fig.points[feature]) == len(rows)
        np.testing.assert_array_equal(fig.points[feature]["quantile"], rows[feature])
        assert len(fig.curves[feature]) == 20 and fig.curves[feature]["count"].sum() == len(rows)
    # the planted trends: SHAP of q_b rises, SHAP of q_a falls
    assert fig.curves["q_b"]["mean_shap"].iloc[-1] > fig.curves["q_b"]["mean_shap"].iloc[0]
    assert fig.curves["q_a"]["mean_shap"].iloc[-1] < fig.curves["q_a"]["mean_shap"].iloc[0]
    # Figure A: with num_samples, three panels; num_samples plotted against its own quantile
    sub = rows.iloc[:300]
    settings = ForestSettings(n_estimators=5, min_samples_leaf=5)
    forest3 = fit_forest(sub, settings, features=WITH_SAMPLES, holdout_repeats=[])
    explained3 = shap_analysis(forest3, sub.loc[:, list(WITH_SAMPLES)])
    fig3 = plot_shap_summary(explained3, sub, tmp_path / "figureA.png")
    assert list(fig3.points) == ["q_a", "q_b", "num_samples"]
    assert all(len(p) == 300 for p in fig3.points.values())
    q = fig3.points["num_samples"]["quantile"]
    assert q.min() >= 0 and q.max() <= 100
    assert (tmp_path / "figureA.pdf").is_file()


def test_shap_analysis_checks_features_and_additivity(planted):
    rows, forest = planted["rows"], planted["forest"]
    sub = rows.iloc[:50]
    explained = shap_analysis(forest, sub.loc[:, ["q_b", "q_a", "lam"]])  # reordered, extra column
    assert explained.feature_names == ("q_a", "q_b") and explained.values.shape == (50, 2)
    np.testing.assert_allclose(explained.prediction(), forest.predict(sub), atol=1e-6)
    with pytest.raises(CalibrationError, match="lacks"):
        shap_analysis(forest, sub.loc[:, ["q_a"]])
