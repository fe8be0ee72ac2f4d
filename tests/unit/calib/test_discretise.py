"""From SHAP curves to a G_SHAP table (livar_calib.discretise), by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from livar_calib.deltas import CalibrationError
from livar_calib.discretise import build_table, discretise_shap, segment_1d, shap_curve_edges
from livar_calib.explain import ShapResult, binned_shap_curve
from livar_merge.errors import TableError
from livar_merge.tables import GShapTable, existing_versions


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
    result = discretise_shap(explained, rows, rule="additive")
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
    np.testing.assert_allclose(
        discretise_shap(three, rows, rule="additive").values, np.add(expected, 0.001)
    )


def test_discretise_cell_mean_by_hand():
    """cell-mean: each row's prediction (base + its SHAP values) averaged per cell; the three
    cells without rows take the additive rule's value (0.01, 0.13, 0.21 above)."""
    explained, rows = hand_shap(0.1, HAND["q_a"], HAND["q_b"], HAND["s_a"], HAND["s_b"])
    result = discretise_shap(explained, rows, rule="cell-mean")
    # rows (b, a): (0,0) 0.12, (1,0) 0.14, (2,1) 0.18, (0,1) 0.07, (1,2) 0.09, (2,2) 0.10
    expected = [
        [0.12, 0.07, 0.01],
        [0.14, 0.13, 0.09],
        [0.21, 0.18, 0.10],
    ]
    np.testing.assert_allclose(result.values, expected, atol=1e-15)
    assert result.counts.tolist() == [[1, 1, 0], [1, 0, 1], [0, 1, 1]]
    assert result.empty_cells == [
        {"b": 0, "a": 2, "filled_with": "additive"},
        {"b": 1, "a": 1, "filled_with": "additive"},
        {"b": 2, "a": 0, "filled_with": "additive"},
    ]
    assert result.report()["rule_name"] == "cell-mean"


def test_discretise_clips_to_floor():
    explained, rows = hand_shap(0.02, HAND["q_a"], HAND["q_b"], HAND["s_a"], HAND["s_b"])
    result = discretise_shap(explained, rows, rule="additive")
    # raw: [[0.02, -0.01, -0.07], [0.04, 0.01, -0.05], [0.09, 0.06, 0.0]] + ..., by hand
    np.testing.assert_allclose(
        result.raw, [[0.02, -0.01, -0.07], [0.08, 0.05, -0.01], [0.13, 0.10, 0.04]], atol=1e-15
    )
    assert result.floor == pytest.approx(2e-4)
    assert [(c["b"], c["a"]) for c in result.clipped] == [(0, 1), (0, 2), (1, 2)]
    assert result.clipped[1]["value"] == pytest.approx(-0.07)
    assert np.all(result.values > 0) and result.values[0, 2] == pytest.approx(2e-4)
    assert discretise_shap(explained, rows, floor=0.005, rule="additive").values[0, 1] == 0.005


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


def test_existing_versions_reads_only_the_named_tables(tmp_path):
    assert existing_versions(tmp_path / "missing", "calib") == []
    for name in ("calib.v1", "calib.v10", "calib.v2", "calib.vx", "calib-b.v3", "calib.v1.v5"):
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "calib.v4.json.tmp").write_text("{}")
    assert existing_versions(tmp_path, "calib") == [1, 2, 10]
    assert existing_versions(tmp_path, "calib-b") == [3]
    assert existing_versions(tmp_path, "calib.v1") == [5]
    assert existing_versions(tmp_path, "cal") == []
