"""Heat maps of G_SHAP tables (Appendix Table A) and side-by-side comparisons of two tables.

A table cell ``values[b, a]`` covers the Q_A percentile range of column ``a`` and the Q_B range
of row ``b``; the heat map draws the cells over those ranges (x: Q_A, y: Q_B, both 0-100), so
the grid lines are the table's quantile edges, labelled on the axes.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import numpy as np

from analysis.style import (
    DIVERGING_CMAP,
    OMEGA_A,
    OMEGA_B,
    SEQUENTIAL_CMAP,
    FigureOutput,
    finish,
    new_figure,
    styled,
)
from livar_merge.tables import GShapTable


def table_label(table: GShapTable) -> str:
    return f"{table.name} v{table.version}"


def _grid(table: GShapTable) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([0.0, *table.edges_a, 100.0]),
        np.array([0.0, *table.edges_b, 100.0]),
    )


def _draw_matrix(
    ax: Any,
    figure: Any,
    matrix: np.ndarray,
    x_edges: np.ndarray,
    y_edges: np.ndarray,
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    label: str,
    fmt: str = "{:.3g}",
    notes: np.ndarray | None = None,
) -> None:
    mesh = ax.pcolormesh(
        x_edges, y_edges, matrix, cmap=cmap, vmin=vmin, vmax=vmax, edgecolors="white", linewidth=1.0
    )
    centres_x = (x_edges[:-1] + x_edges[1:]) / 2
    centres_y = (y_edges[:-1] + y_edges[1:]) / 2
    span = vmax - vmin or 1.0
    for b, y in enumerate(centres_y):
        for a, x in enumerate(centres_x):
            value = matrix[b, a]
            shade = mesh.cmap((value - vmin) / span)
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
            text = fmt.format(value)
            if notes is not None:
                text += "\n" + str(notes[b, a])
            ax.text(
                x,
                y,
                text,
                ha="center",
                va="center",
                fontsize=8 if notes is None else 6.5,
                color="white" if dark else "black",
            )
    ax.set_xticks(x_edges, [f"{e:g}" for e in x_edges])
    ax.set_yticks(y_edges, [f"{e:g}" for e in y_edges])
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(False)
    ax.set_xlabel(f"quantile $Q_A$ of {OMEGA_A} (%)")
    ax.set_ylabel(f"quantile $Q_B$ of {OMEGA_B} (%)")
    figure.colorbar(mesh, ax=ax, label=label, shrink=0.9)


def cell_notes(table: GShapTable) -> np.ndarray | None:
    """Per cell ``"[low, high]\nn=<rows>"`` from a calibrated table's provenance (rows per cell
    and the bootstrap interval over runs, :func:`livar_calib.discretise.cell_intervals`);
    None for a table without them (the paper's, the released code's)."""
    report = table.provenance.get("discretisation") or {}
    counts = report.get("rows_per_cell")
    if counts is None:
        return None
    counts = np.asarray(counts)
    interval = report.get("cell_interval")
    notes = np.empty(counts.shape, dtype=object)
    for b, a in np.ndindex(counts.shape):
        text = f"n={int(counts[b, a])}"
        if interval is not None:
            low, high = interval["low"][b][a], interval["high"][b][a]
            text = f"[{low:.3g}, {high:.3g}]\n" + text
        notes[b, a] = text
    return notes


def _draw_table(ax: Any, figure: Any, table: GShapTable) -> tuple[np.ndarray, Any, Any]:
    """One table's values on its quantile grid (with :func:`cell_notes` where the table has
    them); returns ``(matrix, x_edges, y_edges)``."""
    matrix = np.array(table.values, dtype=np.float64)
    x_edges, y_edges = _grid(table)
    _draw_matrix(
        ax,
        figure,
        matrix,
        x_edges,
        y_edges,
        cmap=SEQUENTIAL_CMAP,
        vmin=float(matrix.min()),
        vmax=float(matrix.max()),
        label="G_SHAP value",
        notes=cell_notes(table),
    )
    return matrix, x_edges, y_edges


def plot_table_heatmap(
    table: GShapTable, path: str | os.PathLike[str], *, title: str | None = None
) -> FigureOutput:
    """Heat map of one table, cells annotated with their values.

    ``data``: ``matrix`` (= ``table.values``, rows Q_B bins from low to high, columns Q_A bins),
    ``x_edges`` / ``y_edges`` (0, the table's percentile edges, 100), ``row_labels`` /
    ``col_labels`` (``table.bin_labels``), ``notes`` (:func:`cell_notes`: each cell's rows and
    its interval over runs, for a calibrated table; else None).
    """
    title = title or f"G_SHAP table {table_label(table)}: un-normalised α per quantile bin"
    with styled():
        figure, (ax,) = new_figure(width=4.8, height=3.8)
        matrix, x_edges, y_edges = _draw_table(ax, figure, table)
        base = "" if table.base_value is None else f", base value {table.base_value:g}"
        ax.set_title(textwrap.fill(f"{table_label(table)}{base}", 48), fontsize=9)
        return finish(
            figure,
            path,
            textwrap.fill(title, 48),
            {
                "matrix": matrix,
                "x_edges": x_edges,
                "y_edges": y_edges,
                "row_labels": table.bin_labels("B"),
                "col_labels": table.bin_labels("A"),
                "notes": cell_notes(table),
            },
        )


def table_difference(
    left: GShapTable, right: GShapTable, *, normalise: bool = True
) -> np.ndarray | None:
    """``left - right`` cell by cell (``None`` if the shapes differ).

    ``normalise``: divide each table by its mean cell first. The coefficients are normalised
    per layer over clients, so a table's overall scale does not change alpha and only the
    relative values are comparable.
    """
    if left.shape != right.shape:
        return None
    a = np.array(left.values, dtype=np.float64)
    b = np.array(right.values, dtype=np.float64)
    if normalise:
        a, b = a / a.mean(), b / b.mean()
    return a - b


def plot_table_comparison(
    left: GShapTable,
    right: GShapTable,
    path: str | os.PathLike[str],
    *,
    normalise: bool = True,
    title: str | None = None,
) -> FigureOutput:
    """Two tables side by side and their difference (:func:`table_difference`).

    ``data``: ``left``, ``right`` (the value matrices), ``difference`` (``None`` when the shapes
    differ: no difference panel), ``same_edges`` (False: cells compared by index although their
    quantile ranges differ), ``normalise``.
    """
    diff = table_difference(left, right, normalise=normalise)
    same_edges = left.edges_a == right.edges_a and left.edges_b == right.edges_b
    title = title or f"G_SHAP tables: {table_label(left)} vs {table_label(right)}"
    with styled():
        figure, axes = new_figure(3 if diff is not None else 2, width=4.6, height=3.8)
        for ax, table in zip(axes, (left, right), strict=False):
            _draw_table(ax, figure, table)
            ax.set_title(table_label(table))
        if diff is not None:
            ax = axes[2]
            x_edges, y_edges = _grid(left)
            bound = float(np.abs(diff).max()) or 1.0
            what = "cell / mean cell" if normalise else "value"
            _draw_matrix(
                ax,
                figure,
                diff,
                x_edges,
                y_edges,
                cmap=DIVERGING_CMAP,
                vmin=-bound,
                vmax=bound,
                label=f"difference of {what}",
                fmt="{:+.2f}",
            )
            note = "" if same_edges else f"\n(bins differ: drawn on {table_label(left)}'s edges)"
            ax.set_title(
                f"{table_label(left)} − {table_label(right)}"
                f"{' (each / its mean)' if normalise else ''}{note}"
            )
        return finish(
            figure,
            path,
            title,
            {
                "left": np.array(left.values, dtype=np.float64),
                "right": np.array(right.values, dtype=np.float64),
                "difference": diff,
                "same_edges": same_edges,
                "normalise": normalise,
            },
        )
