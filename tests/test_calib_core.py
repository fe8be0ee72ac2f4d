"""Numerical core of the calibration pipeline (livar_calib): NNLS, features, forest, SHAP, table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livar_calib.deltas import CalibrationError, RepeatDeltas, load_repeat, save_repeat
from livar_calib.discretise import build_table, discretise_shap, segment_1d, shap_curve_edges
from livar_calib.explain import ShapResult, binned_shap_curve, shap_analysis
from livar_calib.features import add_quantile_features, pooled_percentile_rank
from livar_calib.figures import plot_shap_summary
from livar_calib.forest import WITH_SAMPLES, fit_forest
from livar_calib.nnls import (
    lowrank_cross,
    lowrank_gram,
    lowrank_inner,
    lowrank_sqnorm,
    nnls_dense,
    nnls_lowrank,
    nnls_repeat,
)
from livar_calib.quality import reconstruction_report, summarise_report
from livar_merge.errors import TableError
from livar_merge.tables import GShapTable, assign_bins


def factors(rng: np.random.Generator, d: int, k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((d, r)) / np.sqrt(d), rng.standard_normal((r, k))


def dense(f: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.asarray(f[0], dtype=np.float64) @ np.asarray(f[1], dtype=np.float64)


def dense_objective(lam: np.ndarray, clients: np.ndarray, joint: np.ndarray) -> float:
    return float(np.sum((joint - np.tensordot(lam, clients, axes=1)) ** 2))


# ----------------------------------------------------------------------------------- NNLS
def test_lowrank_inner_and_gram_match_dense(rng):
    d, k = 37, 23
    fs = [factors(rng, d, k, r) for r in (1, 3, 6, 4)]
    joint = factors(rng, d, k, 5)
    ds = [dense(f) for f in fs]
    for i, a in enumerate(fs):
        for j, b in enumerate(fs):
            expected = np.sum(ds[i] * ds[j])
            assert lowrank_inner(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    gram = lowrank_gram(fs)
    np.testing.assert_allclose(gram, [[np.sum(a * b) for b in ds] for a in ds], rtol=1e-12)
    assert np.array_equal(gram, gram.T)
    np.testing.assert_allclose(lowrank_cross(fs, joint), [np.sum(a * dense(joint)) for a in ds])
    assert lowrank_sqnorm(joint) == pytest.approx(np.sum(dense(joint) ** 2), rel=1e-12)
    # float32 factors are accumulated in float64
    f32 = [(u.astype(np.float32), v.astype(np.float32)) for u, v in fs[:2]]
    exact = np.sum(dense(f32[0]) * dense(f32[1]))
    assert lowrank_inner(*f32) == pytest.approx(exact, rel=1e-12)


def planted_layer(rng, m_count, *, negative=True, noise=0.05):
    d, k = (int(x) for x in rng.integers(20, 61, size=2))
    fs = [factors(rng, d, k, int(rng.integers(2, 7))) for _ in range(m_count)]
    lam = rng.uniform(0.0, 1.0, m_count)
    lam[rng.random(m_count) < 0.3] = 0.0
    if negative:
        lam[rng.permutation(m_count)[: max(1, m_count // 3)]] *= -1.0  # active constraints
    noise_f = factors(rng, d, k, 2)
    joint = (
        np.concatenate([lam[m] * fs[m][0] for m in range(m_count)] + [noise * noise_f[0]], 1),
        np.concatenate([fs[m][1] for m in range(m_count)] + [noise_f[1]], 0),
    )
    return fs, joint


@pytest.mark.parametrize("m_count", [2, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nnls_lowrank_matches_dense(m_count, seed):
    rng = np.random.default_rng(100 * seed + m_count)
    fs, joint = planted_layer(rng, m_count)
    clients = np.stack([dense(f) for f in fs])
    lam_dense = nnls_dense(clients, dense(joint))
    result = nnls_lowrank(fs, joint)
    assert result.method == "cholesky" and not result.rank_deficient
    assert result.gram_rank == m_count
    scale = np.abs(lam_dense).max()
    np.testing.assert_allclose(result.lam, lam_dense, rtol=1e-8, atol=1e-8 * scale)
    assert np.all(result.lam >= 0)
    residual = dense_objective(lam_dense, clients, dense(joint))
    assert result.residual_sq == pytest.approx(residual, rel=1e-8)
    assert result.relative_residual == pytest.approx(residual / np.sum(dense(joint) ** 2), 1e-8)
    assert np.any(result.lam == 0.0)  # the negative directions are clipped: constraints active


def test_nnls_lowrank_rank_deficient_cases():
    rng = np.random.default_rng(7)
    d, k = 24, 30
    base = [factors(rng, d, k, 3) for _ in range(4)]
    zero = (np.zeros((d, 3)), rng.standard_normal((3, k)))
    noise = factors(rng, d, k, 2)

    def joint_of(fs, lam):
        return (
            np.concatenate(
                [lam_m * f[0] for lam_m, f in zip(lam, fs, strict=True)] + [noise[0]], 1
            ),
            np.concatenate([f[1] for f in fs] + [noise[1]], 0),
        )

    dup = (base[1][0].copy(), base[1][1].copy())
    scaled = (2.0 * base[2][0], base[2][1])  # a positive multiple: singular, not a duplicate
    tiny_d, tiny_k = 2, 2  # 8 rank-1 clients in a 4-dimensional space
    tiny = [factors(rng, tiny_d, tiny_k, 1) for _ in range(8)]
    tiny_joint = factors(rng, tiny_d, tiny_k, 2)
    cases = {
        "zero client": ([base[0], zero, base[1]], [0.5, 0.3, 0.4]),
        "duplicated clients": ([base[0], base[1], dup, base[2]], [0.2, 0.3, 0.3, 0.5]),
        "positive multiple": ([base[0], base[2], scaled, base[3]], [0.2, 0.3, 0.2, -0.1]),
        "M > rank": (tiny, None),
    }
    for label, (fs, lam) in cases.items():
        joint = tiny_joint if lam is None else joint_of(fs, lam)
        clients = np.stack([dense(f) for f in fs])
        lam_dense = nnls_dense(clients, dense(joint))
        result = nnls_lowrank(fs, joint)
        assert result.rank_deficient, label
        assert result.gram_rank < len(fs), label
        assert np.all(result.lam >= 0), label
        best = dense_objective(lam_dense, clients, dense(joint))
        ours = dense_objective(result.lam, clients, dense(joint))
        assert ours == pytest.approx(best, rel=1e-8), label
        assert result.residual_sq == pytest.approx(best, rel=1e-8), label
        again = nnls_lowrank(fs, joint)
        assert np.array_equal(again.lam, result.lam), f"{label}: not deterministic"
    zero_case = nnls_lowrank(*[cases["zero client"][0], joint_of(*cases["zero client"])])
    assert zero_case.lam[1] == 0.0 and zero_case.excluded == (1,)
    dup_case = nnls_lowrank(cases["duplicated clients"][0], joint_of(*cases["duplicated clients"]))
    assert dup_case.lam[2] == 0.0 and dup_case.excluded == (2,)
    assert dup_case.lam[1] == pytest.approx(0.6, abs=0.05)  # carries both duplicates' weight
    assert nnls_lowrank(tiny, tiny_joint).method == "eigen"
    # all-zero clients and a zero joint delta
    all_zero = nnls_lowrank([zero, zero], (np.zeros((d, 1)), np.zeros((1, k))))
    assert np.array_equal(all_zero.lam, [0.0, 0.0]) and all_zero.relative_residual == 0.0


def test_nnls_repeat_rows(rng):
    deltas = random_repeat(rng, "r0", clients=["a", "b", "c"], layers=["l0", "l1"])
    frame = nnls_repeat(deltas)
    assert list(frame.columns[:5]) == ["repeat_id", "client", "layer", "lam", "relative_residual"]
    assert len(frame) == 6 and set(frame["client"]) == {"a", "b", "c"}
    first = nnls_lowrank(deltas.client_factors["l1"], deltas.joint_factors["l1"]).lam
    np.testing.assert_array_equal(frame.loc[frame["layer"] == "l1", "lam"], first)


# --------------------------------------------------------------------------- repeat files
def random_repeat(rng, repeat_id, *, clients, layers, dtype=np.float64) -> RepeatDeltas:
    shapes = {layer: (int(rng.integers(8, 20)), int(rng.integers(8, 20))) for layer in layers}

    def cast(f):
        return (f[0].astype(dtype), f[1].astype(dtype))

    return RepeatDeltas(
        repeat_id=repeat_id,
        layers=list(layers),
        clients=list(clients),
        client_factors={
            layer: [cast(factors(rng, *shapes[layer], 2 + m % 2)) for m in range(len(clients))]
            for layer in layers
        },
        joint_factors={layer: cast(factors(rng, *shapes[layer], 4)) for layer in layers},
    )


def test_save_load_repeat_round_trip(tmp_path, rng):
    deltas = random_repeat(
        rng, "beta0.1/seed3:r2", clients=["c/0", "c 1", "ü"], layers=["blocks.0.attn.qkv", "fc"]
    )
    deltas.client_factors["fc"][1] = tuple(
        f.astype(np.float32) for f in deltas.client_factors["fc"][1]
    )
    path = save_repeat(tmp_path / "sub" / "round_1.safetensors", deltas)
    assert sorted(p.name for p in path.parent.iterdir()) == ["round_1.safetensors"]  # no tmp left
    back = load_repeat(path)
    assert (back.repeat_id, back.layers, back.clients) == (
        deltas.repeat_id,
        deltas.layers,
        deltas.clients,
    )
    for layer in deltas.layers:
        for (u, v), (u2, v2) in zip(
            deltas.client_factors[layer], back.client_factors[layer], strict=True
        ):
            assert u2.dtype == u.dtype and np.array_equal(u, u2) and np.array_equal(v, v2)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(deltas.joint_factors[layer], back.joint_factors[layer], strict=True)
        )


def test_load_repeat_errors(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    deltas = random_repeat(rng, "r", clients=["a", "b"], layers=["l0", "l1"])
    path = save_repeat(tmp_path / "good.safetensors", deltas)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CalibrationError, match="truncated.safetensors"):
        load_repeat(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CalibrationError, match="garbage.safetensors.*not a readable"):
        load_repeat(garbage)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    missing = dict(tensors)
    del missing["client/1/l1/V"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(
        CalibrationError, match=r"missing.safetensors: missing tensor 'client/1/l1/V'"
    ):
        load_repeat(tmp_path / "missing.safetensors")
    bad_shape = dict(tensors)
    bad_shape["client/0/l0/V"] = np.zeros((7, 3))
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(
        CalibrationError, match=r"shape.safetensors: tensors client/0/l0/U .*client/0/l0/V"
    ):
        load_repeat(tmp_path / "shape.safetensors")
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CalibrationError, match="nometa.safetensors: metadata format"):
        load_repeat(tmp_path / "nometa.safetensors")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_repeat(tmp_path / "absent.safetensors")
    deltas.client_factors["l0"] = deltas.client_factors["l0"][:1]
    with pytest.raises(CalibrationError, match="layer 'l0' needs 2 client factor pairs"):
        save_repeat(tmp_path / "never.safetensors", deltas)
    assert not (tmp_path / "never.safetensors").exists()


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
    forest = fit_forest(rows, seed=0, n_estimators=60, min_samples_leaf=20, n_jobs=2)
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
    result = fit_forest(rows, seed=3, n_estimators=10, holdout_fraction=0.25, n_jobs=1)
    train, test = set(result.train_repeats), set(result.test_repeats)
    assert not train & test and train | test == set(rows["repeat_id"])
    assert len(test) == round(0.25 * N_REPEATS)
    assert result.metrics["n_test"] == len(test) * N_CLIENTS * N_LAYERS
    assert result.model.n_features_in_ == 2
    chosen = fit_forest(rows, seed=0, n_estimators=5, holdout_repeats=["rep01", "rep02"])
    assert chosen.test_repeats == ["rep01", "rep02"] and len(chosen.train_repeats) == N_REPEATS - 2
    everything = fit_forest(rows, n_estimators=5, holdout_repeats=[])
    assert everything.test_repeats == [] and np.isnan(everything.metrics["r2"])
    with pytest.raises(CalibrationError, match="not in rows"):
        fit_forest(rows, n_estimators=5, holdout_repeats=["nope"])
    samples = fit_forest(rows, features=WITH_SAMPLES, n_estimators=5, seed=1)
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
    forest3 = fit_forest(
        sub, features=WITH_SAMPLES, n_estimators=5, min_samples_leaf=5, holdout_repeats=[]
    )
    explained3 = shap_analysis(forest3, sub.loc[:, list(WITH_SAMPLES)])
    fig3 = plot_shap_summary(explained3, sub, tmp_path / "figureA.png")
    assert list(fig3.points) == ["q_a", "q_b", "num_samples"]
    assert all(len(p) == 300 for p in fig3.points.values())
    q = fig3.points["num_samples"]["quantile"]
    assert q.min() >= 0 and q.max() <= 100
    assert (tmp_path / "figureA.pdf").is_file()


# ---------------------------------------------------------------------------- discretise
def hand_shap(base: float, q_a, q_b, s_a, s_b) -> tuple[ShapResult, pd.DataFrame]:
    data = pd.DataFrame({"q_a": q_a, "q_b": q_b}, dtype=float)
    values = pd.DataFrame({"q_a": s_a, "q_b": s_b}, dtype=float)
    return ShapResult(values, base, ("q_a", "q_b"), data), data


HAND = {
    "q_a": [10, 10, 25, 40, 60, 90],  # A bins (25, 50): 0, 0, 1 (on the edge), 1, 2, 2
    "q_b": [50, 70, 90, 10, 65, 85],  # B bins (60, 80): 0, 1, 2, 0, 1, 2
    "s_a": [0.05, 0.03, 0.0, 0.02, -0.04, -0.06],  # means per A bin: 0.04, 0.01, -0.05
    "s_b": [-0.03, 0.01, 0.08, -0.05, 0.03, 0.06],  # means per B bin: -0.04, 0.02, 0.07
}


def test_discretise_hand_computed_cells():
    explained, rows = hand_shap(0.1, HAND["q_a"], HAND["q_b"], HAND["s_a"], HAND["s_b"])
    result = discretise_shap(explained, rows)
    expected = [  # 0.1 + c_b[b] + c_a[a], by hand
        [0.10, 0.07, 0.01],
        [0.16, 0.13, 0.07],
        [0.21, 0.18, 0.12],
    ]
    np.testing.assert_allclose(result.values, expected, atol=1e-15)
    np.testing.assert_allclose(result.contribution_a, [0.04, 0.01, -0.05], atol=1e-15)
    np.testing.assert_allclose(result.contribution_b, [-0.04, 0.02, 0.07], atol=1e-15)
    assert result.counts_a.tolist() == [2, 2, 2] and result.counts_b.tolist() == [2, 2, 2]
    assert result.clipped == [] and result.empty_bins == [] and result.floor == pytest.approx(1e-3)
    # a third feature adds its mean SHAP as a constant
    values = explained.values.assign(num_samples=[0.01, 0.0, 0.0, 0.0, 0.0, -0.004])
    three = ShapResult(values, 0.1, ("q_a", "q_b", "num_samples"), explained.data)
    np.testing.assert_allclose(discretise_shap(three, rows).values, np.add(expected, 0.001))


def test_discretise_clips_to_floor():
    explained, rows = hand_shap(0.02, HAND["q_a"], HAND["q_b"], HAND["s_a"], HAND["s_b"])
    result = discretise_shap(explained, rows)
    # raw: [[0.02, -0.01, -0.07], [0.04, 0.01, -0.05], [0.09, 0.06, 0.0]] + ..., by hand
    np.testing.assert_allclose(
        result.raw, [[0.02, -0.01, -0.07], [0.08, 0.05, -0.01], [0.13, 0.10, 0.04]], atol=1e-15
    )
    assert result.floor == pytest.approx(2e-4)
    assert [(c["b"], c["a"]) for c in result.clipped] == [(0, 1), (0, 2), (1, 2)]
    assert result.clipped[1]["value"] == pytest.approx(-0.07)
    assert np.all(result.values > 0) and result.values[0, 2] == pytest.approx(2e-4)
    assert discretise_shap(explained, rows, floor=0.005).values[0, 1] == 0.005


def test_discretise_empty_bin_uses_nearest_curve_bin(tmp_path):
    q_a = [10, 20, 55, 90, 10, 90]  # nothing in 25 <= q_a <= 50
    s_a = [0.05, 0.03, -0.01, -0.06, 0.07, -0.02]
    explained, rows = hand_shap(0.1, q_a, HAND["q_b"], s_a, HAND["s_b"])
    result = discretise_shap(explained, rows)
    assert result.counts_a.tolist() == [3, 0, 3]
    # bin [25, 50] (centre 37.5): non-empty curve bins have centres 12.5, 22.5, 57.5, 92.5;
    # the nearest is [20, 25) holding the row q_a=20, SHAP 0.03
    assert result.empty_bins == [
        {"feature": "q_a", "bin": 1, "curve_bin": 4, "curve_q_low": 20.0, "curve_q_high": 25.0}
    ]
    assert result.contribution_a[1] == pytest.approx(0.03)
    table, _ = build_table(explained, rows, name="empty", out_dir=tmp_path)
    assert table.provenance["discretisation"]["empty_bins"][0]["curve_bin"] == 4


def test_shap_curve_edges_recover_steps():
    q = np.linspace(0, 100, 2001)
    noise = np.random.default_rng(0).normal(0, 0.002, q.size)
    step_a = np.where(q < 30, 0.1, np.where(q < 70, 0.0, -0.05)) + noise
    step_b = np.where(q < 45, -0.04, np.where(q < 85, 0.02, 0.09)) - noise
    curve = binned_shap_curve(q, step_a, bins=20)
    assert shap_curve_edges(curve, 3) == (30.0, 70.0)
    assert shap_curve_edges(curve, 2) == (30.0,)
    assert segment_1d([0, 0, 1, 1, 1, 5], 3) == [2, 5]
    explained, rows = hand_shap(0.1, q, q[::-1], step_a, step_b[::-1])
    result = discretise_shap(explained, rows, edges_a="shap-curve", edges_b="shap-curve")
    assert result.edges_a == (30.0, 70.0) and result.edges_b == (45.0, 85.0)
    four = discretise_shap(explained, rows, edges_a="shap-curve", n_bins_a=4)
    assert len(four.edges_a) == 3 and all(0 < e < 100 for e in four.edges_a)
    assert np.all(np.diff(four.edges_a) > 0) and four.values.shape == (3, 4)
    with pytest.raises(CalibrationError, match="unknown edge rule"):
        discretise_shap(explained, rows, edges_a="kmeans")


def test_build_table_versions_and_refuses_overwrite(tmp_path):
    explained, rows = hand_shap(0.1, HAND["q_a"], HAND["q_b"], HAND["s_a"], HAND["s_b"])
    prov = {"proxy_dataset": "hand", "date": "2025-01-01"}
    t1, p1 = build_table(explained, rows, name="calib", out_dir=tmp_path, provenance=prov)
    t2, p2 = build_table(explained, rows, name="calib", out_dir=tmp_path, provenance=prov)
    assert (p1.name, p2.name, t2.version) == ("calib.v1.json", "calib.v2.json", 2)
    assert t1.base_value == 0.1 and t1.provenance["proxy_dataset"] == "hand"
    np.testing.assert_allclose(GShapTable.load(p1).values, t1.values)
    before = p1.read_bytes()
    with pytest.raises(TableError, match=r"calib.v1.json exists"):
        build_table(explained, rows, name="calib", version=1, out_dir=tmp_path, provenance=prov)
    assert p1.read_bytes() == before
    _, p7 = build_table(explained, rows, name="calib", version=7, out_dir=tmp_path, provenance=prov)
    _, p8 = build_table(explained, rows, name="calib", out_dir=tmp_path, provenance=prov)
    assert (p7.name, p8.name) == ("calib.v7.json", "calib.v8.json")
    _, other = build_table(explained, rows, name="calib-b", out_dir=tmp_path, provenance=prov)
    assert other.name == "calib-b.v1.json"


def test_shap_analysis_checks_features_and_additivity(planted):
    rows, forest = planted["rows"], planted["forest"]
    sub = rows.iloc[:50]
    explained = shap_analysis(forest, sub.loc[:, ["q_b", "q_a", "lam"]])  # reordered, extra column
    assert explained.feature_names == ("q_a", "q_b") and explained.values.shape == (50, 2)
    np.testing.assert_allclose(explained.prediction(), forest.predict(sub), atol=1e-6)
    with pytest.raises(CalibrationError, match="lacks"):
        shap_analysis(forest, sub.loc[:, ["q_a"]])
