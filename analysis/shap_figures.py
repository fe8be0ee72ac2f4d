"""SHAP figures: Figure 2 and Figure A (proxy calibration), Figures 3 and B-D (a posteriori).

Each panel shows the SHAP value of every calibration row against the feature's quantile (0-100;
``q_a`` / ``q_b`` are pooled over all clients and layers of a round, as in the paper), and the
binned mean SHAP curve (:func:`livar_calib.explain.binned_shap_curve`, equal-width bins). The
a posteriori figures (Sec. 5.4) overlay the proxy's binned curve on another dataset's and mark
the proxy table's fixed bin edges; :func:`curve_agreement` summarises how well the two curves
agree with the Spearman rank correlation of their bin means.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pandas as pd

from analysis.style import (
    CURVE_COLOUR,
    EDGE_COLOUR,
    LAMBDA,
    PROXY_COLOUR,
    SCATTER_COLOUR,
    FigureOutput,
    dataset_name,
    finish,
    new_figure,
    styled,
)
from livar_calib.explain import ShapResult, binned_shap_curve
from livar_calib.features import percentile_rank_1d
from livar_calib.figures import LABELS, TITLES
from livar_merge.errors import ArtifactError
from livar_merge.tables import GShapTable, assign_bins

QUANTILE_FEATURES = ("q_a", "q_b")
TABLE_EDGES = {"q_a": "edges_a", "q_b": "edges_b"}


def feature_quantiles(shap_result: ShapResult, feature: str) -> np.ndarray:
    """Quantile (0-100) of ``feature`` per row: ``q_a``/``q_b`` as stored (pooled per round),
    other features (``num_samples``) ranked over all rows, as :mod:`livar_calib.figures` does."""
    values = shap_result.data[feature].to_numpy(dtype=np.float64)
    return values if feature in QUANTILE_FEATURES else percentile_rank_1d(values)


def shap_points(shap_result: ShapResult) -> dict[str, pd.DataFrame]:
    """``feature -> DataFrame(quantile, shap)``, one row per explained row."""
    return {
        f: pd.DataFrame(
            {
                "quantile": feature_quantiles(shap_result, f),
                "shap": shap_result.values[f].to_numpy(dtype=np.float64),
            }
        )
        for f in shap_result.feature_names
    }


def shap_curves(points: dict[str, pd.DataFrame], bins: int = 20) -> dict[str, pd.DataFrame]:
    """``feature -> binned SHAP curve`` (``bin, q_low, q_high, q_mid, mean_shap, count``)."""
    return {f: binned_shap_curve(p["quantile"], p["shap"], bins=bins) for f, p in points.items()}


def _rank_correlation(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    from scipy.stats import spearmanr

    if x.size < 2:
        return float("nan"), float("nan"), f"only {x.size} bin(s) to compare"
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), "a curve is constant over the compared bins"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue), ""


def curve_agreement(reference: pd.DataFrame, other: pd.DataFrame) -> dict[str, Any]:
    """Spearman rank correlation of two binned SHAP curves' bin means.

    Compares the bins non-empty in both curves (same binning required). 1: same ordering of
    the bins' impact, -1: reversed. NaN (with ``note``) when fewer than two bins are shared or a
    curve is constant there.

    Returns ``{"spearman", "p_value", "bins_compared", "note"}``.
    """
    if len(reference) != len(other) or not np.allclose(reference["q_low"], other["q_low"]):
        raise ArtifactError("the two curves use different bins")
    both = (reference["count"].to_numpy() > 0) & (other["count"].to_numpy() > 0)
    x = reference["mean_shap"].to_numpy(dtype=np.float64)[both]
    y = other["mean_shap"].to_numpy(dtype=np.float64)[both]
    rho, p, note = _rank_correlation(x, y)
    return {"spearman": rho, "p_value": p, "bins_compared": int(both.sum()), "note": note}


def curve_trend(curve: pd.DataFrame) -> float:
    """Spearman correlation of a curve's bin means with the quantile (>0: increasing)."""
    filled = curve.loc[curve["count"] > 0]
    rho, _, _ = _rank_correlation(
        filled["q_mid"].to_numpy(dtype=np.float64), filled["mean_shap"].to_numpy(dtype=np.float64)
    )
    return rho


def table_bin_means(points: pd.DataFrame, edges: tuple[float, ...]) -> list[float]:
    """Mean SHAP per G_SHAP bin (``assign_bins`` on the quantiles; NaN for an empty bin)."""
    index = assign_bins(points["quantile"].to_numpy(), np.asarray(edges, dtype=np.float64))
    shap = points["shap"].to_numpy(dtype=np.float64)
    return [
        float(shap[index == b].mean()) if (index == b).any() else float("nan")
        for b in range(len(edges) + 1)
    ]


def _draw_points_and_curve(ax: Any, points: pd.DataFrame, curve: pd.DataFrame, label: str) -> None:
    ax.scatter(
        points["quantile"], points["shap"], s=5, alpha=0.3, color=SCATTER_COLOUR, lw=0, label="rows"
    )
    filled = curve.loc[curve["count"] > 0]
    ax.plot(filled["q_mid"], filled["mean_shap"], color=CURVE_COLOUR, marker="o", ms=3, label=label)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 100)


def plot_shap_summary(
    shap_result: ShapResult,
    path: str | os.PathLike[str],
    *,
    title: str,
    bins: int = 20,
) -> FigureOutput:
    """Figure 2 / Figure A: SHAP value vs quantile, one panel per feature.

    ``data``: ``points`` (feature -> DataFrame quantile, shap), ``curves`` (feature -> binned
    curve; the red line is its non-empty bins), ``mean_abs_shap`` (feature -> mean |SHAP|),
    ``base_value``.
    """
    points = shap_points(shap_result)
    curves = shap_curves(points, bins)
    mean_abs = {f: float(p["shap"].abs().mean()) for f, p in points.items()}
    features = list(shap_result.feature_names)
    with styled():
        figure, axes = new_figure(len(features), sharey=True)
        for ax, feature in zip(axes, features, strict=True):
            _draw_points_and_curve(ax, points[feature], curves[feature], "binned mean")
            ax.set_title(f"{TITLES.get(feature, feature)} (mean |SHAP| {mean_abs[feature]:.3g})")
            ax.set_xlabel(LABELS.get(feature, f"quantile of {feature} (%)"))
        axes[0].set_ylabel(f"SHAP value (impact on {LAMBDA})")
        axes[0].legend(loc="best")
        base = shap_result.base_value
        suffix = "" if np.isnan(base) else f" — SHAP base value {base:.4g}"
        return finish(
            figure,
            path,
            title + suffix,
            {"points": points, "curves": curves, "mean_abs_shap": mean_abs, "base_value": base},
        )


def plot_aposteriori(
    dataset_shap: ShapResult,
    proxy_shap: ShapResult,
    proxy_table: GShapTable | None,
    path: str | os.PathLike[str],
    *,
    dataset: str,
    proxy: str,
    title: str,
    bins: int = 20,
) -> FigureOutput:
    """Figure 3 / B-D: a dataset's SHAP of ``q_a``, ``q_b`` with the proxy's curve overlaid.

    The proxy's G_SHAP table stays fixed: its bin edges are drawn, and the mean SHAP per table
    bin is computed for both runs. ``data``: ``points``, ``curves`` (dataset), ``proxy_curves``,
    ``agreement`` (feature -> :func:`curve_agreement` of proxy vs dataset, plus ``trend_proxy``,
    ``trend_dataset``), ``table_bins`` (feature -> edges, proxy and dataset bin means).
    """
    features = [f for f in QUANTILE_FEATURES if f in dataset_shap.feature_names]
    features = [f for f in features if f in proxy_shap.feature_names]
    if not features:
        raise ArtifactError("neither q_a nor q_b is explained in both runs")
    points = {f: p for f, p in shap_points(dataset_shap).items() if f in features}
    proxy_points = {f: p for f, p in shap_points(proxy_shap).items() if f in features}
    curves = shap_curves(points, bins)
    proxy_curves = shap_curves(proxy_points, bins)
    agreement: dict[str, dict[str, Any]] = {}
    table_bins: dict[str, dict[str, Any]] = {}
    for f in features:
        agreement[f] = {
            **curve_agreement(proxy_curves[f], curves[f]),
            "trend_proxy": curve_trend(proxy_curves[f]),
            "trend_dataset": curve_trend(curves[f]),
        }
        if proxy_table is not None:
            edges = getattr(proxy_table, TABLE_EDGES[f])
            table_bins[f] = {
                "edges": list(edges),
                "proxy": table_bin_means(proxy_points[f], edges),
                "dataset": table_bin_means(points[f], edges),
            }
    with styled():
        figure, axes = new_figure(len(features), sharey=True)
        for ax, f in zip(axes, features, strict=True):
            _draw_points_and_curve(ax, points[f], curves[f], f"{dataset_name(dataset)} binned mean")
            filled = proxy_curves[f].loc[proxy_curves[f]["count"] > 0]
            ax.plot(
                filled["q_mid"],
                filled["mean_shap"],
                color=PROXY_COLOUR,
                ls="--",
                marker="s",
                ms=3,
                label=f"proxy ({dataset_name(proxy)}) binned mean",
            )
            for i, edge in enumerate(table_bins.get(f, {}).get("edges", [])):
                ax.axvline(
                    edge,
                    color=EDGE_COLOUR,
                    lw=0.8,
                    ls=":",
                    label="proxy G_SHAP bin edges" if i == 0 else None,
                )
            rho = agreement[f]["spearman"]
            text = "n/a" if np.isnan(rho) else f"{rho:.2f}"
            ax.set_title(f"{TITLES.get(f, f)}: Spearman ρ (proxy vs dataset) = {text}")
            ax.set_xlabel(LABELS.get(f, f))
        axes[0].set_ylabel(f"SHAP value (impact on {LAMBDA})")
        axes[0].legend(loc="best")
        return finish(
            figure,
            path,
            title,
            {
                "points": points,
                "curves": curves,
                "proxy_curves": proxy_curves,
                "agreement": agreement,
                "table_bins": table_bins,
            },
        )
