"""The run-folder layout and its one reader: paths, layout versions, sweep roots, and that
every run-folder file name has its home in ``run_layout`` (no literal elsewhere)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from livar_merge.errors import ArtifactError, RunReadError
from livar_merge.federated.migrations import OPTIONS_VERSION
from livar_merge.federated.run_layout import (
    LAYOUT_VERSION,
    TABLES,
    RunLayout,
    RunReader,
    run_folders,
)
from tests.helpers import REPO, write_run


def test_reader_reads_a_written_run_and_versionless_folders_are_layout_1(tmp_path: Path):
    folder = write_run(tmp_path, "fashion-mnist", "livar", 0.5, 1, [0.3, 0.6])
    run = RunReader.open(folder)
    assert (run.dataset, run.method, run.beta, run.seed) == ("fashion-mnist", "livar", 0.5, 1)
    assert run.finished and run.summary["final_accuracy"] == 0.6
    assert run.metrics["test_accuracy"].tolist() == [0.3, 0.6]
    assert run.provenance == {} and not run.has_table("paired")
    assert "layout_version" not in json.loads(RunLayout(folder).config.read_text())


def test_reader_refuses_a_newer_layout_and_names_the_file(tmp_path: Path):
    folder = write_run(tmp_path, "fashion-mnist", "livar", 0.5, 1, [0.3])
    layout = RunLayout(folder)
    document = json.loads(layout.config.read_text())
    layout.config.write_text(json.dumps({**document, "layout_version": LAYOUT_VERSION + 1}))
    with pytest.raises(RunReadError, match=r"config\.json: layout_version 2; this livar reads"):
        RunReader.open(folder)
    layout.config.write_text(json.dumps({"config_hash": "x"}))
    with pytest.raises(ArtifactError, match=r"config\.json has no 'config' object"):
        RunReader.open(folder)


def test_the_reader_upgrades_options_by_their_version(tmp_path: Path):
    """A folder without ``options_version`` is version 1 (boolean ``augment``); version 2 is
    read as written (a boolean there is left for the option check to refuse); a newer version
    is refused naming the file."""
    folder = write_run(tmp_path, "fashion-mnist", "livar", 0.5, 1, [0.3])
    layout = RunLayout(folder)
    document = json.loads(layout.config.read_text())
    layout.config.write_text(json.dumps({**document, "config": {"augment": True, "lr": 0.1}}))
    assert RunReader.open(folder).config == {"augment": "pad-crop", "lr": 0.1}
    for version, augment in ((OPTIONS_VERSION, True), (OPTIONS_VERSION, "rrc")):
        written = {**document, "options_version": version, "config": {"augment": augment}}
        layout.config.write_text(json.dumps(written))
        assert RunReader.open(folder).config == {"augment": augment}
    written = {**document, "options_version": OPTIONS_VERSION + 1, "config": {}}
    layout.config.write_text(json.dumps(written))
    with pytest.raises(RunReadError, match=r"config\.json: options_version 3: this livar reads"):
        _ = RunReader.open(folder).config


def test_unfinished_runs_and_missing_tables(tmp_path: Path):
    folder = write_run(tmp_path, "fashion-mnist", "fedavg", 0.5, 0, [0.3], finished=False)
    run = RunReader(folder)
    assert not run.finished and run.summary is None
    with pytest.raises(RunReadError, match=r"alpha\.csv is missing"):
        _ = run.alpha
    with pytest.raises(ValueError, match="not a run table"):
        run.layout.table("summary")


def test_run_folders_of_a_run_and_of_a_sweep_root(tmp_path: Path):
    a = write_run(tmp_path, "fashion-mnist", "fedavg", 0.5, 0, [0.3])
    b = write_run(tmp_path, "fashion-mnist", "livar", 0.5, 0, [0.3], finished=False)
    (tmp_path / "not-a-run").mkdir()
    assert run_folders(tmp_path) == [a, b]
    assert run_folders(a) == [a]
    assert run_folders(tmp_path / "missing") == []


def test_written_run_has_every_path_of_its_layout(tmp_path: Path):
    """A real (tiny, 1 round) livar-fed run holds the header, tables, summary and checkpoint
    at the paths of its layout, and the reader reads it."""
    from livar_merge.engines.inprocess import run_federated
    from livar_merge.federated.config import resolve_config

    config = resolve_config("tiny", None, {"rounds": 1, "method": "livar", "paired": ["fedavg"]})
    run_federated(config, tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    for path in (layout.config, layout.provenance, layout.partition, layout.metrics_json):
        assert path.is_file(), path
    assert layout.is_finished() and layout.has_checkpoint()
    for name in ("metrics", "clients", "alpha", "head_weights", "paired"):
        assert layout.table(name).is_file(), name
    assert not layout.table("replies").exists()  # optional, written once it has rows
    run = RunReader.open(layout.root)
    assert run.document["layout_version"] == LAYOUT_VERSION
    assert run.document["options_version"] == OPTIONS_VERSION
    assert run.config == config.to_dict()  # today's options come back as written
    assert run.config_hash == config.config_hash()
    assert run.summary["final_accuracy"] == pytest.approx(run.metrics["test_accuracy"].iloc[-1])
    assert sorted(p.name for p in layout.root.rglob("*.tmp")) == []


RUN_FILES = [f"{name}.csv" for name in TABLES] + [
    "metrics.json",
    "summary.json",
    "provenance.json",
    "global.safetensors",
]


def test_run_folder_file_names_live_only_in_the_layout_module():
    """No module of the runtime, the Flower apps or analysis spells a run-folder file name
    (calibration folders have their own files: their reader, analysis/artifacts.py, and
    livar_calib are not scanned)."""
    home = REPO / "livar_merge" / "federated" / "run_layout.py"
    calibration_reader = REPO / "analysis" / "artifacts.py"
    sources = [
        *(REPO / "livar_merge").rglob("*.py"),
        *(REPO / "analysis").rglob("*.py"),
    ]
    names = "|".join(re.escape(n) for n in RUN_FILES)
    pattern = re.compile(rf"""["']({names})["']""")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        if path not in (home, calibration_reader)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
