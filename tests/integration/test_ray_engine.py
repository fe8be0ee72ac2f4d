"""``--engine ray`` of livar-calibrate and livar-sweep: the same outputs as the serial engine.

A local Ray with 2 CPUs (module fixture, shut down after); the tiny calibration with two betas
(two proxy runs, so two Ray tasks) and a tiny two-method sweep. Files are compared by content:
CSV, PNG and the run folders' config.json byte for byte, safetensors tensor by tensor, JSON
parsed, without timings, paths and provenance. Floats of JSON files are compared to 1e-12
relative: the forest's metrics come from a 2-thread prediction whose tree sums are not ordered,
so their last bits already differ between two serial runs (as the table checksum over them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from livar_calib.cli import main as calibrate
from livar_merge.apps.sweep import main as sweep
from tests.helpers import tiny_sweep_args

ray = pytest.importorskip("ray")

CALIB = ["--preset", "tiny", "--betas", "0.5", "1.0", "--seeds", "0", "--rounds", "2"]
# provenance.json: versions, argv, git (the machine's, not the run's); stages.json: checksums of
# the .skops files (zip timestamps), its input digests are compared on their own
SKIPPED = {"provenance.json", "stages.json"}
UNORDERED_SUFFIXES = {".skops", ".pdf"}  # zip / PDF timestamps differ between serial runs
IGNORED_KEYS = {"timings_seconds", "machine", "checksum", "table", "published"}  # timings, paths


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_calibration(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    assert calibrate([*CALIB, "--out", str(out)]) == 0
    return out


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {}), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def assert_same_safetensors(a: Path, b: Path) -> None:
    """Same metadata and tensors (the metadata is a hash map: its byte order varies)."""
    (meta_a, tensors_a), (meta_b, tensors_b) = _tensors(a), _tensors(b)
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys(), a
    for key, value in tensors_a.items():
        assert torch.equal(value, tensors_b[key]), f"{a}: {key}"


def _same_json(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - IGNORED_KEYS
        assert keys == set(b) - IGNORED_KEYS, where
        for key in keys:
            _same_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-12) or (a != a and b != b), where
    else:
        assert a == b, where


def assert_same_outputs(ours: Path, reference: Path, *, skip: set[str] = SKIPPED) -> None:
    """Every file of ``reference`` is in ``ours`` (and no other), with the same content."""
    assert _files(ours) == _files(reference)
    for rel in _files(reference):
        a, b = ours / rel, reference / rel
        if Path(rel).name in skip or a.suffix in UNORDERED_SUFFIXES:
            continue
        if a.suffix == ".safetensors":
            assert_same_safetensors(a, b)
        elif a.suffix == ".json":
            _same_json(json.loads(a.read_text()), json.loads(b.read_text()), rel)
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_calibration_on_ray_matches_serial(local_ray, serial_calibration, tmp_path):
    out = tmp_path / "ray"
    assert calibrate([*CALIB, "--out", str(out), "--engine", "ray"]) == 0
    assert_same_outputs(out, serial_calibration)
    assert (out / "config.json").read_bytes() == (serial_calibration / "config.json").read_bytes()
    ledgers = [json.loads((f / "stages.json").read_text()) for f in (out, serial_calibration)]
    assert [{k: e["inputs"] for k, e in ledger.items()} for ledger in ledgers] == [
        {k: e["inputs"] for k, e in ledgers[1].items()}
    ] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["repeats"] == 4  # 2 betas x 1 seed x 2 rounds


def test_interrupted_serial_calibration_is_finished_on_ray(
    local_ray, serial_calibration, tmp_path, monkeypatch
):
    import livar_calib.proxy as proxy_module

    out = tmp_path / "run"
    real = proxy_module.train_client
    calls = {"n": 0}

    def crashing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:  # b0.5-s0 round 2 (4 trainees a round), after client_0 and client_1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(proxy_module, "train_client", crashing)
    with pytest.raises(KeyboardInterrupt):
        calibrate([*CALIB, "--out", str(out)])
    first = out / "proxy/b0.5-s0"
    assert sorted(p.name for p in (first / "round_2_partial").iterdir()) == [
        "client_0.safetensors",
        "client_1.safetensors",
    ]
    assert not (out / "proxy/b1-s0").exists()
    stamp = os.stat(first / "round_1.safetensors").st_mtime_ns
    monkeypatch.setattr(proxy_module, "train_client", real)
    assert calibrate([*CALIB, "--out", str(out), "--resume", "--engine", "ray"]) == 0
    assert os.stat(first / "round_1.safetensors").st_mtime_ns == stamp  # round 1 not redone
    assert not (first / "round_2_partial").exists()
    assert_same_outputs(out, serial_calibration)


SWEEP = tiny_sweep_args("fedavg", "livar")


def _summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text())


def _without_timings(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c.endswith("seconds")])


def test_sweep_on_ray_matches_serial(local_ray, tmp_path):
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    assert sweep(["--root", str(serial), *SWEEP]) == 0
    assert sweep(["--root", str(on_ray), *SWEEP, "--engine", "ray"]) == 0
    runs = sorted(p.parent.name for p in serial.glob("*/summary.json"))
    assert runs == ["synthetic-fedavg-b0.5-s0", "synthetic-livar-b0.5-s0"]
    assert sorted(p.parent.name for p in on_ray.glob("*/summary.json")) == runs
    for run in runs:
        assert _files(on_ray / run) == _files(serial / run)
        for table in ("metrics.csv", "clients.csv"):
            pd.testing.assert_frame_equal(
                _without_timings(pd.read_csv(on_ray / run / table)),
                _without_timings(pd.read_csv(serial / run / table)),
            )
        ours, theirs = (_summary(r / run) for r in (on_ray, serial))
        for key in ("final_accuracy", "best_accuracy"):
            assert ours[key] == theirs[key]
        assert (on_ray / run / "config.json").read_bytes() == (
            serial / run / "config.json"
        ).read_bytes()
        for rel in _files(serial / run):
            if rel.endswith(".safetensors"):  # the final checkpoint
                assert_same_safetensors(on_ray / run / rel, serial / run / rel)
    assert (on_ray / "table.csv").read_bytes() == (serial / "table.csv").read_bytes()
