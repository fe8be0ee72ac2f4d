"""Tables 1-4 (analysis.tables) from hand-written sweeps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.tables import (
    PAPER_TABLES,
    build_table,
    collect_sweeps,
    override_specs,
    write_table,
)
from livar_merge.apps.grid_results import MISSING_CELL
from livar_merge.errors import ArtifactError
from tests.helpers import (
    write_sweep,
)


# ------------------------------------------------------------------------- Tables 1-4
def test_paper_tables_cells_and_missing_marks(tmp_path: Path):
    rows, problems = collect_sweeps([write_sweep(tmp_path / "sweep")])
    assert problems == []
    assert len(rows) == 13  # the unfinished run is not collected
    table1 = build_table(rows, PAPER_TABLES["table1"])
    cells = table1.cells
    assert list(cells.index) == ["FedAvg", "RegMean", "FisherAvg", "FedProto", "CCVR", "LIVAR"]
    assert list(cells.columns) == [
        f"{d} β={b}" for d in ("CIFAR-100", "ImageNet-R") for b in ("1.0", "0.5", "0.2")
    ]
    assert cells.loc["LIVAR", "CIFAR-100 β=1.0"] == "93.57 (0.12)"
    assert cells.loc["FedAvg", "CIFAR-100 β=1.0"] == "93.20 (0.28)"
    assert cells.loc["CCVR", "CIFAR-100 β=1.0"] == "93.27 [n=1]"
    assert cells.loc["LIVAR", "ImageNet-R β=0.5"] == MISSING_CELL
    assert cells.loc["RegMean", "CIFAR-100 β=1.0"] == MISSING_CELL
    assert cells.loc["FisherAvg", "CIFAR-100 β=1.0"] == "93.40 [n=1]"
    assert (table1.missing, table1.total) == (32, 36)

    table4 = build_table(rows, PAPER_TABLES["table4"])
    t4 = table4.cells
    assert list(t4.columns) == ["α^l", "σ^(c)", "Avg (std)"]
    assert list(t4["α^l"]) == ["", "✓", "", "✓"]
    assert list(t4["σ^(c)"]) == ["", "", "✓", "✓"]
    assert t4.loc["FedAvg", "Avg (std)"] == "79.24 (0.11)"
    assert t4.loc["LIVAR", "Avg (std)"] == "90.93 (0.07)"
    assert t4.loc["LIVAR (σ only)", "Avg (std)"] == MISSING_CELL  # unfinished run
    assert table4.missing == 1

    files = write_table(table1, tmp_path / "tables")
    assert [f.name for f in files] == ["table1.csv", "table1.md", "table1_stats.csv"]
    back = pd.read_csv(files[0], index_col=0, keep_default_na=False)
    assert back.loc["LIVAR", "CIFAR-100 β=1.0"] == "93.57 (0.12)"
    assert back.loc["LIVAR", "ImageNet-R β=1.0"] == MISSING_CELL
    markdown = files[1].read_text()
    assert "| LIVAR | 93.57 (0.12) | — |" in markdown and "**Table 1**" in markdown
    stats = pd.read_csv(files[2])
    livar = stats.loc[(stats["method"] == "livar") & (stats["beta"] == 1.0)].iloc[0]
    assert livar["n"] == 3 and livar["mean"] == pytest.approx(0.9357)


def test_table_spec_overrides():
    specs = override_specs(PAPER_TABLES, {"table4": ["fashion-mnist"]}, [0.5], 0.1)
    assert specs["table4"].datasets == ("fashion-mnist",) and specs["table4"].betas == (0.1,)
    assert specs["table1"].betas == (0.5,)
    with pytest.raises(
        ArtifactError, match=r"table4 is laid out for exactly one dataset, got \['a', 'b'\]"
    ):
        override_specs(PAPER_TABLES, {"table4": ["a", "b"]})
    with pytest.raises(ArtifactError, match="unknown table 'table9'"):
        override_specs(PAPER_TABLES, {"table9": ["a"]})
