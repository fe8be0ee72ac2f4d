"""Reading run folders back (analysis.artifacts)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.artifacts import ArtifactError, CalibrationRun
from tests.helpers import (
    write_calibration,
)


def test_shap_rows_mismatch_is_an_artifact_error(tmp_path: Path):
    root = write_calibration(tmp_path / "cal")
    pd.DataFrame({"q_a": [0.0], "q_b": [0.0]}).to_csv(root / "shap_values.csv", index=False)
    with pytest.raises(ArtifactError, match="same order"):
        CalibrationRun.open(root).shap()
