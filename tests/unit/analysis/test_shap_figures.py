"""Figures 2, A, 3 and B-D (analysis.shap_figures) from hand-written calibration runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.artifacts import CalibrationRun
from analysis.shap_figures import (
    curve_agreement,
    plot_aposteriori,
    plot_shap_summary,
    table_bin_means,
)
from livar_calib.explain import binned_shap_curve
from livar_merge.errors import ArtifactError
from tests.helpers import (
    BINNED_A,
    BINNED_B,
    COUNTS_A,
    Q_A,
    Q_B,
    SHAP_A,
    write_calibration,
)


# ------------------------------------------------------------------------- Figures 2 and A
def test_figure2_plots_points_and_hand_computed_binned_means(calibration: Path, tmp_path: Path):
    run = CalibrationRun.open(calibration)
    assert run.name == "tiny-imagenet"  # from config.json
    out = plot_shap_summary(run.shap(), tmp_path / "f" / "figure2", title="Figure 2", bins=4)
    assert out.png.is_file() and out.pdf.is_file() and out.png.name == "figure2.png"
    points, curves = out.data["points"], out.data["curves"]
    assert list(points) == ["q_a", "q_b"]
    assert len(points["q_a"]) == len(Q_A) == len(points["q_b"])
    np.testing.assert_array_equal(points["q_a"]["quantile"], Q_A)
    np.testing.assert_array_equal(points["q_a"]["shap"], SHAP_A)
    np.testing.assert_array_equal(points["q_b"]["quantile"], Q_B)
    np.testing.assert_allclose(curves["q_a"]["mean_shap"], BINNED_A)
    np.testing.assert_array_equal(curves["q_a"]["count"], COUNTS_A)
    np.testing.assert_allclose(curves["q_b"]["mean_shap"], BINNED_B)  # empty bin: NaN
    np.testing.assert_array_equal(curves["q_b"]["count"], [2, 0, 2, 3])
    np.testing.assert_allclose(curves["q_a"]["q_mid"], [12.5, 37.5, 62.5, 87.5])
    assert out.data["mean_abs_shap"]["q_a"] == pytest.approx(np.mean(np.abs(SHAP_A)))
    assert out.data["base_value"] == 0.25
    assert "base value 0.25" in out.title


def test_figure_a_ranks_num_samples_over_all_rows(calibration: Path, tmp_path: Path):
    out = plot_shap_summary(
        CalibrationRun.open(calibration).shap(samples=True),
        tmp_path / "figureA",
        title="Figure A",
        bins=4,
    )
    assert list(out.data["points"]) == ["q_a", "q_b", "num_samples"]
    # samples 10 x3, 20 x2, 30 x2: mean positions 1, 3.5, 5.5 of 0..6
    expected = 100 * np.array([1, 1, 1, 3.5, 3.5, 5.5, 5.5]) / 6
    np.testing.assert_allclose(out.data["points"]["num_samples"]["quantile"], expected)
    np.testing.assert_allclose(out.data["points"]["num_samples"]["shap"], 0.01)
    assert out.data["base_value"] == 0.3  # base_value_samples


# ------------------------------------------------------------------------- Figures 3, B-D
def test_curve_agreement_identical_reversed_and_constant():
    q = np.linspace(0, 100, 41)
    up = binned_shap_curve(q, q / 100, bins=10)
    down = binned_shap_curve(q, -q / 100, bins=10)
    flat = binned_shap_curve(q, np.zeros_like(q), bins=10)
    same = curve_agreement(up, up)
    assert same["spearman"] == pytest.approx(1.0) and same["bins_compared"] == 10
    assert curve_agreement(up, down)["spearman"] == pytest.approx(-1.0)
    constant = curve_agreement(up, flat)
    assert np.isnan(constant["spearman"]) and "constant" in constant["note"]
    with pytest.raises(ArtifactError, match="different bins"):
        curve_agreement(up, binned_shap_curve(q, q, bins=5))


@pytest.mark.parametrize(("sign", "rho"), [(1.0, 1.0), (-1.0, -1.0)])
def test_aposteriori_overlays_proxy_curve_and_reports_agreement(tmp_path: Path, sign, rho):
    q = list(np.linspace(0, 100, 21))
    shap = [v / 100 for v in q]
    proxy = write_calibration(
        tmp_path / "proxy", q_a=q, q_b=q, shap_a=shap, shap_b=shap, samples=False
    )
    other = write_calibration(
        tmp_path / "other",
        q_a=q,
        q_b=q,
        shap_a=[sign * s for s in shap],
        shap_b=[sign * s for s in shap],
        samples=False,
        proxy="imagenet-r",
    )
    proxy_run, other_run = CalibrationRun.open(proxy), CalibrationRun.open(other)
    table = proxy_run.table()
    out = plot_aposteriori(
        other_run.shap(),
        proxy_run.shap(),
        table,
        tmp_path / "figure3",
        dataset="imagenet-r",
        proxy="tiny-imagenet",
        title="Figure 3",
        bins=5,
    )
    for feature in ("q_a", "q_b"):
        agreement = out.data["agreement"][feature]
        assert agreement["spearman"] == pytest.approx(rho)
        assert agreement["bins_compared"] == 5
        assert agreement["trend_proxy"] == pytest.approx(1.0)
        assert agreement["trend_dataset"] == pytest.approx(rho)
        np.testing.assert_allclose(
            out.data["curves"][feature]["mean_shap"],
            sign * out.data["proxy_curves"][feature]["mean_shap"],
        )
    # the proxy table's bins stay fixed: edges 25, 50 for omega_A
    bins = out.data["table_bins"]["q_a"]
    assert bins["edges"] == [25.0, 50.0]
    proxy_points = pd.DataFrame({"quantile": q, "shap": shap})
    expected = [
        np.mean([s for v, s in zip(q, shap, strict=True) if v < 25]),
        np.mean([s for v, s in zip(q, shap, strict=True) if 25 <= v <= 50]),
        np.mean([s for v, s in zip(q, shap, strict=True) if v > 50]),
    ]
    np.testing.assert_allclose(bins["proxy"], expected)
    np.testing.assert_allclose(table_bin_means(proxy_points, (25.0, 50.0)), expected)
    np.testing.assert_allclose(bins["dataset"], sign * np.array(expected))
    assert out.png.is_file() and out.pdf.is_file()
