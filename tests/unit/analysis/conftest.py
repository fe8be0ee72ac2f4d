from pathlib import Path

import pytest

from tests.helpers import write_calibration


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    return write_calibration(tmp_path / "cal")
