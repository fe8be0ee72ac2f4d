"""G_SHAP table heat maps and comparisons (analysis.table_figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.table_figures import plot_table_comparison, plot_table_heatmap, table_difference
from livar_merge import GShapTable
from livar_merge.tables import make_table
from tests.helpers import (
    CAL_TABLE,
)


# ------------------------------------------------------------------------- table figures
def test_table_heatmap_matrix_equals_table_values(tmp_path: Path):
    table = GShapTable.load("paper-table-a")
    out = plot_table_heatmap(table, tmp_path / "heat")
    np.testing.assert_array_equal(out.data["matrix"], table.values)
    np.testing.assert_array_equal(out.data["x_edges"], [0, 25, 50, 100])
    np.testing.assert_array_equal(out.data["y_edges"], [0, 60, 80, 100])
    assert out.data["row_labels"] == ["Q_B<60", "60<=Q_B<=80", "Q_B>80"]
    assert out.data["col_labels"] == ["Q_A<25", "25<=Q_A<=50", "Q_A>50"]
    assert out.png.stat().st_size > 0 and out.pdf.stat().st_size > 0


def test_calibrated_table_heatmap_shows_rows_and_intervals_per_cell(tmp_path: Path):
    counts = [[320, 250, 900], [40, 150, 300], [7, 100, 813]]
    low = [[0.05, 0.06, 0.07], [0.08, 0.09, 0.1], [0.11, 0.12, 0.13]]
    high = [[0.15, 0.16, 0.17], [0.18, 0.19, 0.2], [0.21, 0.22, 0.33]]
    provenance = {
        "discretisation": {"rows_per_cell": counts, "cell_interval": {"low": low, "high": high}}
    }
    table = make_table("calibrated", 1, CAL_TABLE, provenance=provenance)
    out = plot_table_heatmap(table, tmp_path / "heat")
    assert out.data["notes"][2, 0] == "[0.11, 0.21]\nn=7"
    assert out.data["notes"][0, 2] == "[0.07, 0.17]\nn=900"
    paper = plot_table_heatmap(GShapTable.load("paper-table-a"), tmp_path / "p")
    assert paper.data["notes"] is None


def test_table_comparison_difference_panel(tmp_path: Path):
    left = make_table("left", 1, CAL_TABLE)
    right = GShapTable.load("paper-table-a")
    out = plot_table_comparison(left, right, tmp_path / "cmp")
    a, b = np.array(CAL_TABLE), np.array(right.values)
    np.testing.assert_allclose(out.data["difference"], a / a.mean() - b / b.mean())
    np.testing.assert_array_equal(out.data["left"], a)
    assert out.data["same_edges"]
    np.testing.assert_allclose(table_difference(left, right, normalise=False), a - b)
    other = make_table("two-by-two", 1, [[1, 2], [3, 4]], edges_a=(50,), edges_b=(50,))
    assert plot_table_comparison(left, other, tmp_path / "shape").data["difference"] is None
