"""SHAP summary figure: the paper's Figure 2 (q_a, q_b) and Figure A (with num_samples).

One panel per feature: the SHAP value of every row against the feature's quantile (0-100,
pooled per repeat for omega_A / omega_B as in Figure 2), with the binned mean SHAP as a line.
Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from livar_calib.explain import ShapResult, binned_shap_curve
from livar_calib.features import percentile_rank_1d
from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_QUANTILE_COLUMNS = {"q_a": "q_a", "q_b": "q_b"}
LABELS = {
    "q_a": "quantile of $\\omega^{l_A}_m$ (%)",
    "q_b": "quantile of $\\omega^{l_B}_m$ (%)",
    "num_samples": "quantile of the number of samples (%)",
}
TITLES = {"q_a": "$\\omega^{l_A}$", "q_b": "$\\omega^{l_B}$", "num_samples": "samples"}


@dataclass(frozen=True)
class ShapFigure:
    """What :func:`plot_shap_summary` drew and wrote.

    Attributes:
        png, pdf: the written files.
        points: ``feature -> DataFrame(quantile, shap)``, one row per explained row.
        curves: ``feature -> binned curve`` (:func:`livar_calib.explain.binned_shap_curve`).
    """

    png: Path
    pdf: Path
    points: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)


def _quantile(
    feature: str, shap_result: ShapResult, rows: pd.DataFrame | None, columns: Mapping[str, str]
) -> np.ndarray:
    n = len(shap_result.values)
    column = columns.get(feature)
    if column is not None:
        for source in (rows, shap_result.data):
            if source is not None and column in source.columns:
                if len(source) != n:
                    raise CalibrationError(f"rows has {len(source)} rows, SHAP result {n}")
                return source[column].to_numpy(dtype=np.float64)
        raise CalibrationError(f"no column {column!r} with the quantiles of {feature!r}")
    return percentile_rank_1d(shap_result.data[feature].to_numpy(dtype=np.float64))


def plot_shap_summary(
    shap_result: ShapResult,
    rows: pd.DataFrame | None,
    path: str | os.PathLike[str],
    *,
    bins: int = 20,
    quantile_columns: Mapping[str, str] = DEFAULT_QUANTILE_COLUMNS,
    title: str = "SHAP values of the calibration forest",
    dpi: int = 150,
) -> ShapFigure:
    """Draw SHAP value vs quantile per feature; write ``path`` as ``.png`` and ``.pdf``.

    Args:
        shap_result: SHAP values; row ``i`` belongs to row ``i`` of ``rows``.
        rows: rows holding the quantile columns (``None``: read them from ``shap_result.data``).
        path: output path; its suffix is replaced by ``.png`` and ``.pdf``.
        quantile_columns: SHAP feature -> column holding its quantile; other features (e.g.
            ``num_samples``) are ranked over all rows with the same percentile rank.
    """
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    features = list(shap_result.feature_names)
    if not features:
        raise CalibrationError("SHAP result has no features to plot")
    points: dict[str, pd.DataFrame] = {}
    curves: dict[str, pd.DataFrame] = {}
    for feature in features:
        q = _quantile(feature, shap_result, rows, quantile_columns)
        s = shap_result.values[feature].to_numpy(dtype=np.float64)
        points[feature] = pd.DataFrame({"quantile": q, "shap": s})
        curves[feature] = binned_shap_curve(q, s, bins=bins)

    figure = Figure(figsize=(4.2 * len(features), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(features), sharey=True, squeeze=False)[0]
    for ax, feature in zip(axes, features, strict=True):
        pts, curve = points[feature], curves[feature]
        ax.scatter(pts["quantile"], pts["shap"], s=4, alpha=0.25, color="tab:blue", lw=0)
        filled = curve.loc[curve["count"] > 0]
        ax.plot(filled["q_mid"], filled["mean_shap"], color="tab:red", lw=2, label="binned mean")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 100)
        ax.set_title(TITLES.get(feature, feature))
        ax.set_xlabel(LABELS.get(feature, f"quantile of {feature} (%)"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SHAP value (impact on $\\lambda^l_m$)")
    axes[0].legend(loc="best", fontsize="small")
    figure.suptitle(f"{title} (base value {shap_result.base_value:.4g})")
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = base.with_suffix(".png"), base.with_suffix(".pdf")
    figure.savefig(png, dpi=dpi)
    figure.savefig(pdf)
    return ShapFigure(png=png, pdf=pdf, points=points, curves=curves)
