"""SHAP analysis of the calibration forest (paper Sec. 4.1, Figure 2).

``shap.TreeExplainer`` gives exact SHAP values of tree ensembles (path-dependent perturbation:
the background is the training data the trees saw). For every row,
``base_value + sum_f shap[f] = forest prediction``; :func:`shap_analysis` checks this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd

ADDITIVITY_TOL = 1e-6


@dataclass(frozen=True)
class ShapResult:
    """SHAP values of a forest on ``data``.

    Attributes:
        values: DataFrame ``[n, features]`` of SHAP values (same index as ``data``).
        base_value: the explainer's expected value (mean prediction over the trees' data).
        feature_names: column order of ``values``.
        data: the explained feature values ``[n, features]``.
        interactions: SHAP interaction values ``[n, features, features]`` (main effects on the
            diagonal, each row's ``[f, :]`` summing to ``values[f]``), or None when not asked.
    """

    values: pd.DataFrame
    base_value: float
    feature_names: tuple[str, ...]
    data: pd.DataFrame
    interactions: np.ndarray | None = None

    def prediction(self) -> np.ndarray:
        """``base_value + sum of SHAP values`` per row ``[n]``."""
        return self.base_value + self.values.to_numpy().sum(axis=1)


def _model(forest: Any) -> Any:
    return getattr(forest, "model", forest)  # accept a ForestResult


def shap_analysis(
    forest: Any, X: pd.DataFrame, *, tol: float = ADDITIVITY_TOL, interactions: bool = False
) -> ShapResult:
    """Exact tree SHAP values of ``forest`` (a fitted RandomForestRegressor or ForestResult).

    Args:
        X: rows to explain, with exactly the forest's feature columns (any order; reordered).
        tol: additivity tolerance; raises :class:`CalibrationError` if
            ``|base + sum SHAP - prediction| > tol`` for any row (and, with ``interactions``,
            if an interaction row does not sum to its SHAP value).
        interactions: also compute ``TreeExplainer.shap_interaction_values`` (about 3 times
            the time of the SHAP values; needed by the ``interaction`` discretisation).
    """
    import pandas as pd
    import shap

    model = _model(forest)
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        raise CalibrationError("forest was fitted without feature names; fit it on a DataFrame")
    names = tuple(str(n) for n in names)
    missing = [n for n in names if n not in X.columns]
    if missing:
        raise CalibrationError(f"X lacks the forest's feature column(s) {missing}")
    data = X.loc[:, list(names)]
    explainer = shap.TreeExplainer(model)
    values = np.asarray(explainer.shap_values(data, check_additivity=False), dtype=np.float64)
    base = float(np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)[0])
    if values.shape != data.shape:
        raise CalibrationError(f"SHAP values have shape {values.shape}, expected {data.shape}")
    prediction = model.predict(data)
    gap = np.abs(base + values.sum(axis=1) - prediction)
    if gap.size and gap.max() > tol:
        row = int(np.argmax(gap))
        raise CalibrationError(
            f"SHAP additivity fails: base + sum of SHAP differs from the prediction by "
            f"{gap[row]:.3g} at row {row} (tolerance {tol:g})"
        )
    phi = None
    if interactions:
        phi = np.asarray(explainer.shap_interaction_values(data), dtype=np.float64)
        if phi.shape != (*data.shape, data.shape[1]):
            raise CalibrationError(f"SHAP interaction values have shape {phi.shape}")
        gap = np.abs(phi.sum(axis=2) - values)
        if gap.size and gap.max() > tol:
            raise CalibrationError(
                f"SHAP interaction rows do not sum to the SHAP values (gap {gap.max():.3g})"
            )
    frame = pd.DataFrame(values, index=data.index, columns=list(names))
    return ShapResult(
        values=frame, base_value=base, feature_names=names, data=data.copy(), interactions=phi
    )


def binned_shap_curve(q: Any, shap: Any, bins: int = 20) -> pd.DataFrame:
    """Mean SHAP value per equal-width bin of the quantiles ``q`` (0-100), ``q``, ``shap`` ``[n]``.

    Bin ``i`` covers ``[100 i / bins, 100 (i + 1) / bins)``; the last bin includes 100.
    Returns a DataFrame with one row per bin: ``bin, q_low, q_high, q_mid, mean_shap`` (NaN if
    empty), ``count``.
    """
    import pandas as pd

    q = np.asarray(q, dtype=np.float64).reshape(-1)
    s = np.asarray(shap, dtype=np.float64).reshape(-1)
    if q.shape != s.shape:
        raise CalibrationError(f"{q.size} quantiles but {s.size} SHAP values")
    if bins < 1:
        raise CalibrationError(f"bins must be >= 1, got {bins}")
    if q.size and (np.nanmin(q) < 0 or np.nanmax(q) > 100 or not np.all(np.isfinite(q))):
        raise CalibrationError("quantiles must be finite and within [0, 100]")
    index = np.minimum((q * bins / 100.0).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    total = np.bincount(index, weights=s, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    low = 100.0 * np.arange(bins) / bins
    high = 100.0 * np.arange(1, bins + 1) / bins
    return pd.DataFrame(
        {
            "bin": np.arange(bins),
            "q_low": low,
            "q_high": high,
            "q_mid": (low + high) / 2.0,
            "mean_shap": mean,
            "count": count,
        }
    )
