"""Discretise SHAP values into a G_SHAP table (paper Appendix A, Eq. 5).

Appendix A: the table's values "are obtained by summing a SHAP base value with the SHAP values of
individual features". Three rules (:func:`discretise_shap`, ``rule=``; ``livar-calibrate
--discretise``):

``additive``     cell(b, a) = base_value + mean SHAP_A over rows with q_a in A-bin a
                                         + mean SHAP_B over rows with q_b in B-bin b
                                         + sum over other features f of mean SHAP_f (all rows)
                 An additive table: it cannot hold an effect of omega_A that depends on the
                 omega_B bin (the paper's Table A has none for Q_B < 60 and a large one for
                 Q_B > 80; the best additive fit of Table A misses a cell by 0.025 (minimax, by
                 linear programming; the least-squares additive fit misses by 0.035)).
``interaction``  cell(b, a) = base_value + mean main_A(bin a) + mean main_B(bin b)
                              + mean (Phi_AB + Phi_BA) over the rows of cell (b, a)
                              + mean over all rows of every other interaction entry,
                 with Phi the SHAP interaction values of ``TreeExplainer`` (main effects on
                 the diagonal; ``sum_g Phi_fg = SHAP_f``). An empty cell gets no interaction
                 term (reported).
``cell-mean``    cell(b, a) = mean over the rows of cell (b, a) of the forest's prediction,
                 which equals base_value + sum_f SHAP_f of those rows (SHAP additivity). An
                 empty cell takes the additive rule's value (reported). The default: it
                 reproduces a planted Table A as well as ``interaction`` (both within 0.002 of
                 every cell on the planted test; the test's bound is 0.01) without a second,
                 slower SHAP pass.

Common to all rules:

* ``SHAP_A`` / ``SHAP_B`` are the SHAP values of the forest's ``q_a`` / ``q_b`` features; bins
  come from :func:`livar_merge.tables.assign_bins` on the rows' quantile features (0-100) with
  the table's percentile edges, the same rule the server applies to omega values at those
  percentiles (:mod:`livar_calib.features` makes the two agree). Default edges are the paper's:
  A at 25, 50 and B at 60, 80.
* Other features (e.g. ``num_samples``, Appendix B) cannot be looked up by the server; their
  average contribution over the calibration rows is added as a constant (about 0 for SHAP
  values explained on the forest's own training data).
* Empty bin (no rows): the mean SHAP of the nearest non-empty bin of the binned SHAP curve
  (:func:`livar_calib.explain.binned_shap_curve`, ``curve_bins`` equal-width bins) to the table
  bin's centre is used instead, and the substitution is reported.
* Thin cells are shrunk (``min_cell_rows``, ``livar-calibrate --min-cell-rows``, default 50):
  under ``interaction`` and ``cell-mean`` a cell with ``n`` rows takes
  ``prior + min(1, n / min_cell_rows) * (rule value - prior)``, the prior being the
  ``additive`` rule's cell (for ``interaction``: the cell without its (q_a, q_b) interaction
  term, i.e. base + main effects), so a cell seen by a handful of rows stays near the additive
  value and an empty cell is the additive value. Rows per cell, the shrinkage weights and the
  unshrunk cells go into the report. What it costs, measured on the planted Table A with
  correlated features (``tests/unit/calib/test_discretise_rules.py``): where the truth is
  non-additive and a thin cell's forest prediction is right, shrinkage pulls it towards the
  additive value (a 13-row cell at rho = -0.8: error 0.014 unshrunk, 0.056 shrunk); it guards
  against a table entry set by a few rows, not against a wrong forest.
* Per-cell intervals (:func:`cell_intervals`, ``--cell-resamples``): a percentile bootstrap
  over whole calibration runs with the forest held fixed (:data:`CELL_INTERVAL_METHOD`).
* Cells must be positive: values below ``floor`` are raised to it and reported. Default floor:
  ``max(0.01 * |base_value|, 1e-6)``.
* ``edges_a="shap-curve"`` (or ``edges_b``): the edges are chosen from the binned SHAP curve of
  that feature by optimal 1-D segmentation into ``n_bins`` pieces (dynamic programming that
  minimises the within-segment squared error of the curve's non-empty bin means); edges lie on
  curve-bin boundaries, strictly increasing, inside (0, 100).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from livar_calib.explain import ShapResult, binned_shap_curve
from livar_merge.errors import CalibrationError, TableError
from livar_merge.tables import (
    GShapTable,
    assign_bins,
    existing_versions,
    make_table,
    table_file_name,
)

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_EDGES_A = (25.0, 50.0)
DEFAULT_EDGES_B = (60.0, 80.0)
SHAP_CURVE = "shap-curve"
FLOOR_FRACTION = 0.01
FLOOR_MIN = 1e-6
_COMMON = (
    "; bins by livar_merge.tables.assign_bins on the per-repeat quantile features; empty bins "
    "take the nearest non-empty SHAP-curve bin; cells below the floor are raised to it"
)
RULES = {
    "additive": "cell(b, a) = base_value + mean SHAP(q_a) over rows in A-bin a + mean SHAP(q_b) "
    "over rows in B-bin b + mean SHAP of other features over all rows" + _COMMON,
    "interaction": "cell(b, a) = base_value + mean main effect of q_a over A-bin a + mean main "
    "effect of q_b over B-bin b + mean SHAP interaction of (q_a, q_b) over the rows of cell "
    "(b, a) + mean of every other interaction entry over all rows" + _COMMON,
    "cell-mean": "cell(b, a) = mean forest prediction (base_value + sum of SHAP) over the rows "
    "of cell (b, a); an empty cell takes the additive rule's value" + _COMMON,
}
DEFAULT_RULE = "cell-mean"
SHRINKAGE_RULE = (
    "cell = prior + min(1, n / min_cell_rows) * (rule value - prior), n the cell's rows; prior: "
    "the additive rule's cell (interaction: the cell without its interaction term)"
)
CELL_INTERVAL_METHOD = (
    "percentile bootstrap over the calibration runs (each resample draws whole (beta, seed) "
    "runs with replacement and discretises their rows again with the same edges, floor and "
    "shrinkage; the forest and its SHAP values are held fixed, so forest-refit variability "
    "is not included)"
)

EdgeSpec = Sequence[float] | str


@dataclass(frozen=True)
class Discretisation:
    """Result of :func:`discretise_shap`.

    Attributes:
        values: ``[B bins, A bins]`` positive cells (after the floor).
        raw: the cells before the floor.
        base_value: SHAP base value.
        edges_a, edges_b: percentile edges used.
        contribution_a, contribution_b: mean SHAP per A-bin / B-bin.
        constant: summed mean SHAP of the other features.
        counts_a, counts_b: rows per bin.
        floor: the floor applied.
        clipped: ``{"b", "a", "value"}`` for every cell raised to the floor.
        empty_bins: ``{"feature", "bin", "curve_bin", "curve_q_low", "curve_q_high"}`` for each
            empty table bin filled from the SHAP curve.
        rule: the discretisation rule (``RULES``).
        counts: ``[B bins, A bins]`` rows per cell.
        interaction: ``[B bins, A bins]`` mean (q_a, q_b) interaction per cell (``interaction``
            rule only).
        empty_cells: ``{"b", "a", "filled_with"}`` for each cell without rows (``interaction``,
            ``cell-mean``).
    """

    values: np.ndarray
    raw: np.ndarray
    base_value: float
    edges_a: tuple[float, ...]
    edges_b: tuple[float, ...]
    contribution_a: np.ndarray
    contribution_b: np.ndarray
    constant: float
    counts_a: np.ndarray
    counts_b: np.ndarray
    floor: float
    clipped: list[dict[str, Any]] = field(default_factory=list)
    empty_bins: list[dict[str, Any]] = field(default_factory=list)
    rule: str = "additive"
    counts: np.ndarray | None = None
    interaction: np.ndarray | None = None
    empty_cells: list[dict[str, Any]] = field(default_factory=list)
    min_cell_rows: int = 0
    shrinkage_weight: np.ndarray | None = None
    unshrunk: np.ndarray | None = None
    cell_low: np.ndarray | None = None
    cell_high: np.ndarray | None = None
    interval: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-serialisable summary (stored in the table's provenance)."""
        extra: dict[str, Any] = {}
        if self.counts is not None:
            extra["rows_per_cell"] = self.counts.astype(int).tolist()
        if self.interaction is not None:
            extra["interaction_per_cell"] = self.interaction.tolist()
        if self.shrinkage_weight is not None and self.unshrunk is not None:
            extra["shrinkage"] = {
                "min_cell_rows": self.min_cell_rows,
                "rule": SHRINKAGE_RULE,
                "weight_per_cell": self.shrinkage_weight.tolist(),
                "unshrunk_cells": self.unshrunk.tolist(),
            }
        if self.cell_low is not None and self.cell_high is not None:
            extra["cell_interval"] = {
                **self.interval,
                "low": self.cell_low.tolist(),
                "high": self.cell_high.tolist(),
            }
        return {
            "rule_name": self.rule,
            "rule": RULES[self.rule],
            "base_value": float(self.base_value),
            "edges_a": list(self.edges_a),
            "edges_b": list(self.edges_b),
            "contribution_a": [float(v) for v in self.contribution_a],
            "contribution_b": [float(v) for v in self.contribution_b],
            "other_features_constant": float(self.constant),
            "rows_per_bin_a": [int(v) for v in self.counts_a],
            "rows_per_bin_b": [int(v) for v in self.counts_b],
            "floor": float(self.floor),
            "clipped_cells": list(self.clipped),
            "empty_bins": list(self.empty_bins),
            "empty_cells": list(self.empty_cells),
            **extra,
        }


def segment_1d(y: Sequence[float], n_segments: int) -> list[int]:
    """Optimal split of ``y`` into ``n_segments`` contiguous pieces (least squared error).

    Dynamic programming over prefix sums, ``O(n_segments * n^2)``. Returns the start indices of
    segments 2..K (``K - 1`` increasing indices in ``1..n-1``). Ties go to the earliest split.
    """
    values = np.asarray(y, dtype=np.float64)
    n = values.size
    if not 1 <= n_segments <= n:
        raise CalibrationError(f"cannot cut {n} points into {n_segments} segments")
    s1 = np.concatenate([[0.0], np.cumsum(values)])
    s2 = np.concatenate([[0.0], np.cumsum(values * values)])

    def cost(i: int, j: int) -> float:  # squared error of y[i:j] around its mean
        total = s1[j] - s1[i]
        return float(s2[j] - s2[i] - total * total / (j - i))

    best = np.full((n_segments + 1, n + 1), np.inf)
    back = np.zeros((n_segments + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, n_segments + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                candidate = best[k - 1, i] + cost(i, j)
                if candidate < best[k, j] - 1e-15 * max(1.0, abs(candidate)):
                    best[k, j], back[k, j] = candidate, i
    starts = []
    j = n
    for k in range(n_segments, 1, -1):
        j = int(back[k, j])
        starts.append(j)
    return sorted(starts)


def shap_curve_edges(curve: pd.DataFrame, n_bins: int = 3) -> tuple[float, ...]:
    """``n_bins - 1`` percentile edges from a binned SHAP curve by optimal segmentation.

    Segments the non-empty bins' ``mean_shap`` (:func:`segment_1d`); each edge is the upper
    boundary (``q_high``) of the last non-empty curve bin of a segment.
    """
    filled = curve.loc[curve["count"] > 0].reset_index(drop=True)
    if len(filled) < n_bins:
        raise CalibrationError(
            f"SHAP curve has {len(filled)} non-empty bins; cannot choose {n_bins} table bins"
        )
    starts = segment_1d(filled["mean_shap"].to_numpy(), n_bins)
    return tuple(float(filled["q_high"].iloc[s - 1]) for s in starts)


def _check_edges(edges: Sequence[float], what: str) -> tuple[float, ...]:
    out = tuple(float(e) for e in edges)
    if any(not (0.0 < e < 100.0) for e in out) or any(b <= a for a, b in itertools.pairwise(out)):
        raise CalibrationError(
            f"{what} must be strictly increasing percentiles inside (0, 100), got {out}"
        )
    return out


def _bin_contributions(
    q: np.ndarray,
    shap_values: np.ndarray,
    edges: tuple[float, ...],
    *,
    feature: str,
    curve_bins: int,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Mean SHAP per table bin, row counts, and the empty bins filled from the curve."""
    n_bins = len(edges) + 1
    index = assign_bins(q, np.asarray(edges))
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=shap_values, minlength=n_bins)
    contribution = np.zeros(n_bins)
    empty: list[dict[str, Any]] = []
    curve = None
    bounds = (0.0, *edges, 100.0)
    for i in range(n_bins):
        if counts[i] > 0:
            contribution[i] = sums[i] / counts[i]
            continue
        if curve is None:
            curve = binned_shap_curve(q, shap_values, bins=curve_bins)
            curve = curve.loc[curve["count"] > 0]
            if curve.empty:
                raise CalibrationError(f"no rows to estimate the SHAP values of {feature}")
        centre = (bounds[i] + bounds[i + 1]) / 2.0
        nearest = curve.iloc[int(np.argmin(np.abs(curve["q_mid"].to_numpy() - centre)))]
        contribution[i] = float(nearest["mean_shap"])
        empty.append(
            {
                "feature": feature,
                "bin": i,
                "curve_bin": int(nearest["bin"]),
                "curve_q_low": float(nearest["q_low"]),
                "curve_q_high": float(nearest["q_high"]),
            }
        )
    return contribution, counts, empty


def _quantiles(rows: pd.DataFrame, column: str, n: int) -> np.ndarray:
    if column not in rows.columns:
        raise CalibrationError(f"rows lack the quantile column {column!r}")
    if len(rows) != n:
        raise CalibrationError(f"rows has {len(rows)} rows but the SHAP result {n}; align them")
    q = rows[column].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(q)) or q.min(initial=0) < 0 or q.max(initial=0) > 100:
        raise CalibrationError(f"rows: column {column!r} must hold percentiles in [0, 100]")
    return q


def discretise_shap(
    shap_result: ShapResult,
    rows: pd.DataFrame,
    *,
    edges_a: EdgeSpec = DEFAULT_EDGES_A,
    edges_b: EdgeSpec = DEFAULT_EDGES_B,
    feature_a: str = "q_a",
    feature_b: str = "q_b",
    quantile_a: str = "q_a",
    quantile_b: str = "q_b",
    n_bins_a: int = 3,
    n_bins_b: int = 3,
    curve_bins: int = 20,
    floor: float | None = None,
    rule: str = DEFAULT_RULE,
    min_cell_rows: int = 0,
) -> Discretisation:
    """Table cells from SHAP values (rules in the module docstring).

    Args:
        shap_result: SHAP values of the forest; row ``i`` belongs to row ``i`` of ``rows``.
        rows: the explained rows, holding the quantile columns ``quantile_a``/``quantile_b``.
        edges_a, edges_b: percentile edges, or ``"shap-curve"`` to choose ``n_bins_a - 1`` /
            ``n_bins_b - 1`` edges from the binned SHAP curve.
        feature_a, feature_b: SHAP columns of omega_A / omega_B.
        curve_bins: bins of the SHAP curve used for empty bins and ``"shap-curve"`` edges.
        floor: minimum cell value; default ``max(0.01 * |base_value|, 1e-6)``.
        rule: ``"additive"``, ``"interaction"`` (needs ``shap_result.interactions``, from
            ``shap_analysis(..., interactions=True)``) or ``"cell-mean"``.
        min_cell_rows: shrinkage of thin cells (``interaction``/``cell-mean``): a cell with
            ``n`` rows takes ``additive + min(1, n / min_cell_rows) (rule value - additive)``
            (0 rows: the additive value; ``0`` turns shrinkage off).
    """
    if rule not in RULES:
        raise CalibrationError(f"unknown discretisation rule {rule!r}; choose from {list(RULES)}")
    values = shap_result.values
    for feature in (feature_a, feature_b):
        if feature not in values.columns:
            raise CalibrationError(
                f"SHAP result has no feature {feature!r}; features: {list(values.columns)}"
            )
    n = len(values)
    q_a = _quantiles(rows, quantile_a, n)
    q_b = _quantiles(rows, quantile_b, n)
    s_a = values[feature_a].to_numpy(dtype=np.float64)
    s_b = values[feature_b].to_numpy(dtype=np.float64)

    def resolve(spec: EdgeSpec, q: np.ndarray, s: np.ndarray, k: int, what: str) -> tuple:
        if isinstance(spec, str):
            if spec != SHAP_CURVE:
                raise CalibrationError(f"{what}: unknown edge rule {spec!r}; use {SHAP_CURVE!r}")
            return shap_curve_edges(binned_shap_curve(q, s, bins=curve_bins), k)
        return _check_edges(spec, what)

    e_a = resolve(edges_a, q_a, s_a, n_bins_a, "edges_a")
    e_b = resolve(edges_b, q_b, s_b, n_bins_b, "edges_b")
    base = float(shap_result.base_value)
    bin_a, bin_b = assign_bins(q_a, np.asarray(e_a)), assign_bins(q_b, np.asarray(e_b))
    shape = (len(e_b) + 1, len(e_a) + 1)
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, (bin_b, bin_a), 1)
    others = [f for f in values.columns if f not in (feature_a, feature_b)]
    constant = float(sum(values[f].mean() for f in others)) if others else 0.0
    interaction = None
    empty_cells: list[dict[str, Any]] = []
    if rule == "interaction":
        phi = _interactions(shap_result, feature_a, feature_b)
        i_a, i_b = (
            shap_result.feature_names.index(feature_a),
            shap_result.feature_names.index(feature_b),
        )
        s_a, s_b = phi[:, i_a, i_a], phi[:, i_b, i_b]  # main effects
        pair = phi[:, i_a, i_b] + phi[:, i_b, i_a]
        constant = float(phi.sum(axis=(1, 2)).mean() - s_a.mean() - s_b.mean() - pair.mean())
        interaction, missing = _cell_means(pair, bin_b, bin_a, counts)
        interaction[missing] = 0.0
        empty_cells = [
            {"b": int(b), "a": int(a), "filled_with": "no interaction"}
            for b, a in zip(*np.nonzero(missing), strict=True)
        ]
    c_a, n_a, empty_a = _bin_contributions(q_a, s_a, e_a, feature=feature_a, curve_bins=curve_bins)
    c_b, n_b, empty_b = _bin_contributions(q_b, s_b, e_b, feature=feature_b, curve_bins=curve_bins)
    additive = base + constant + c_b[:, None] + c_a[None, :]
    unshrunk = additive
    if interaction is not None:
        unshrunk = additive + interaction
    elif rule == "cell-mean":
        means, missing = _cell_means(shap_result.prediction(), bin_b, bin_a, counts)
        unshrunk = np.where(missing, additive, means)
        empty_cells = [
            {"b": int(b), "a": int(a), "filled_with": "additive"}
            for b, a in zip(*np.nonzero(missing), strict=True)
        ]
    if min_cell_rows < 0:
        raise CalibrationError(f"min_cell_rows must be >= 0, got {min_cell_rows}")
    weight = np.ones(shape)
    if rule != "additive" and min_cell_rows > 0:
        weight = np.minimum(1.0, counts / float(min_cell_rows))
    raw = additive + weight * (unshrunk - additive)
    if floor is None:
        floor = max(FLOOR_FRACTION * abs(base), FLOOR_MIN)
    if not floor > 0:
        raise CalibrationError(f"floor must be positive, got {floor}")
    clipped = [
        {"b": int(b), "a": int(a), "value": float(raw[b, a])}
        for b, a in zip(*np.nonzero(raw < floor), strict=True)
    ]
    return Discretisation(
        values=np.maximum(raw, floor),
        raw=raw,
        base_value=base,
        edges_a=e_a,
        edges_b=e_b,
        contribution_a=c_a,
        contribution_b=c_b,
        constant=constant,
        counts_a=n_a,
        counts_b=n_b,
        floor=float(floor),
        clipped=clipped,
        empty_bins=empty_a + empty_b,
        rule=rule,
        counts=counts,
        interaction=interaction,
        empty_cells=empty_cells,
        min_cell_rows=int(min_cell_rows),
        shrinkage_weight=weight,
        unshrunk=unshrunk,
    )


def _cell_means(
    values: np.ndarray, bin_b: np.ndarray, bin_a: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values [n]`` per cell ``[B, A]`` and the mask of cells without rows."""
    sums = np.zeros(counts.shape)
    np.add.at(sums, (bin_b, bin_a), values)
    missing = counts == 0
    return np.where(missing, 0.0, sums / np.maximum(counts, 1)), missing


def _interactions(shap_result: ShapResult, feature_a: str, feature_b: str) -> np.ndarray:
    phi = shap_result.interactions
    if phi is None:
        raise CalibrationError(
            "rule 'interaction' needs SHAP interaction values: "
            "shap_analysis(forest, X, interactions=True)"
        )
    return phi


def _subset(shap_result: ShapResult, index: np.ndarray) -> ShapResult:
    """The SHAP result of the rows ``index`` (repeats allowed), with fresh row labels."""
    return replace(
        shap_result,
        values=shap_result.values.iloc[index].reset_index(drop=True),
        data=shap_result.data.iloc[index].reset_index(drop=True),
        interactions=None if shap_result.interactions is None else shap_result.interactions[index],
    )


def cell_intervals(
    shap_result: ShapResult,
    rows: pd.DataFrame,
    result: Discretisation,
    *,
    runs: Sequence[Any],
    resamples: int,
    seed: int = 0,
    level: float = 0.95,
    **options: Any,
) -> Discretisation:
    """``result`` with per-cell ``level`` intervals (:data:`CELL_INTERVAL_METHOD`): whole runs
    (``runs[i]`` the run of row ``i``) resampled with replacement ``resamples`` times, each
    resample discretised with ``result``'s edges, floor, rule and ``min_cell_rows``.
    ``options`` are the other :func:`discretise_shap` arguments used for ``result``."""
    labels = np.asarray([str(r) for r in runs])
    if len(labels) != len(rows):
        raise CalibrationError(f"runs has {len(labels)} entries, rows {len(rows)}")
    unique = np.unique(labels)
    if resamples <= 0 or len(unique) < 2:
        return result
    members = [np.flatnonzero(labels == run) for run in unique]
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, *result.values.shape))
    for k in range(resamples):
        index = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        draws[k] = discretise_shap(
            _subset(shap_result, index),
            rows.iloc[index].reset_index(drop=True),
            edges_a=result.edges_a,
            edges_b=result.edges_b,
            floor=result.floor,
            rule=result.rule,
            min_cell_rows=result.min_cell_rows,
            **options,
        ).values
    tail = (1.0 - level) / 2.0 * 100.0
    return replace(
        result,
        cell_low=np.percentile(draws, tail, axis=0),
        cell_high=np.percentile(draws, 100.0 - tail, axis=0),
        interval={
            "level": level,
            "resamples": resamples,
            "runs": len(unique),
            "seed": seed,
            "method": CELL_INTERVAL_METHOD,
        },
    )


def build_table(
    shap_result: ShapResult,
    rows: pd.DataFrame,
    *,
    name: str,
    version: int | None = None,
    out_dir: str | os.PathLike[str],
    edges_a: EdgeSpec = DEFAULT_EDGES_A,
    edges_b: EdgeSpec = DEFAULT_EDGES_B,
    provenance: dict[str, Any] | None = None,
    description: str = "",
    rule: str = DEFAULT_RULE,
    runs: Sequence[Any] | None = None,
    resamples: int = 0,
    seed: int = 0,
    **options: Any,
) -> tuple[GShapTable, Path]:
    """Discretise SHAP values into a G_SHAP table and write ``<out_dir>/<name>.v<N>.json``.

    ``version=None`` takes the next free version in ``out_dir``; an existing file is never
    overwritten (:class:`livar_merge.errors.TableError`). ``options`` go to
    :func:`discretise_shap` (``feature_a``, ``n_bins_a``, ``curve_bins``, ``floor``, ...). The
    discretisation report (rule, edges, clipped cells, empty bins) is stored in the table's
    ``provenance["discretisation"]``; with ``runs`` (the run of each row) and ``resamples`` it
    holds per-cell bootstrap intervals over runs too (:func:`cell_intervals`).
    """
    result = discretise_shap(
        shap_result, rows, edges_a=edges_a, edges_b=edges_b, rule=rule, **options
    )
    if runs is not None:
        extra = {k: v for k, v in options.items() if k != "min_cell_rows"}
        result = cell_intervals(
            shap_result, rows, result, runs=runs, resamples=resamples, seed=seed, **extra
        )
    out = Path(out_dir)
    if version is None:
        version = max(existing_versions(out, name), default=0) + 1
    target = out / table_file_name(name, version)
    if target.exists():
        raise TableError(f"{target} exists; tables are immutable: choose another version")
    prov: dict[str, Any] = {
        "source": "livar_calib: SHAP of the calibration random forest, discretised",
        "date": _dt.datetime.now(_dt.UTC).date().isoformat(),
    }
    prov.update(provenance or {})
    prov["discretisation"] = result.report()
    table = make_table(
        name,
        version,
        result.values,
        edges_a=result.edges_a,
        edges_b=result.edges_b,
        base_value=result.base_value,
        provenance=prov,
        description=description or f"G_SHAP table ({rule} discretisation): {RULES[rule]}",
    )
    return table, table.save(target)
