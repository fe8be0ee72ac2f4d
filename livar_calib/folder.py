"""The files of a calibration folder that readers outside the pipeline need (the report)."""

from __future__ import annotations

from pathlib import Path

SUMMARY = "summary.json"
STAGES = "stages.json"
TABLE_DIR = "table"
FIGURES_DIR = "figures"


def is_finished_calibration(root: Path) -> bool:
    """Whether ``root`` holds a finished calibration (its stage ledger and summary)."""
    return (root / STAGES).is_file() and (root / SUMMARY).is_file()
