"""The Ray engine's folder shipping, without Ray: a task's changes rebuild the folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest

from livar_merge._options import add_dataclass_options
from livar_merge.engines.ray_engine import (
    EngineOptions,
    FolderTracker,
    apply_change,
    engine_options,
    folder_files,
    import_ray,
)
from livar_merge.errors import EngineUnavailableError, LivarError


def test_tracked_changes_rebuild_the_folder(tmp_path: Path):
    worker, driver = tmp_path / "worker", tmp_path / "driver"
    (worker / "partial").mkdir(parents=True)
    (worker / "partial/a.bin").write_bytes(b"a")
    (worker / "state.json").write_text('{"completed_rounds": 0}')
    driver.mkdir()
    apply_change(driver, FolderTracker(tmp_path / "empty").changes())  # nothing yet
    for rel, data in folder_files(worker).items():  # what the driver shipped
        (driver / rel).parent.mkdir(parents=True, exist_ok=True)
        (driver / rel).write_bytes(data)
    tracker = FolderTracker(worker)
    assert not tracker.changes()
    (worker / "round_1.csv").write_text("x\n1\n")
    (worker / "state.json").write_text('{"completed_rounds": 1}')
    shutil.rmtree(worker / "partial")
    (worker / "empty").mkdir()
    change = tracker.changes()
    assert list(change.files) == ["round_1.csv", "state.json"]  # in the order written
    assert change.removed_dirs == ["partial"] and change.removed_files == []
    apply_change(driver, change)
    assert folder_files(driver) == folder_files(worker)
    assert (driver / "empty").is_dir() and not (driver / "partial").exists()
    assert not tracker.changes()


def test_engine_options_from_the_command_line():
    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, EngineOptions)
    options = engine_options(parser.parse_args(["--engine", "ray", "--ray-gpus-per-task", "0.5"]))
    assert options == EngineOptions(engine="ray", ray_gpus_per_task=0.5)
    assert engine_options(parser.parse_args([])) == EngineOptions()
    with pytest.raises(LivarError, match="ray_cpus_per_task"):
        engine_options(argparse.Namespace(ray_cpus_per_task="0"))


def test_missing_ray_is_a_livar_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(EngineUnavailableError, match="--engine ray needs the ray package"):
        import_ray()
