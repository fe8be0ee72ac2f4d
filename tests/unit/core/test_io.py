"""livar_merge._io: atomic writes keep the old file on failure and leave no temporary file,
JSON/CSV conventions, file digests against hashlib, reads that name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from livar_merge._io import (
    atomic_write,
    file_sha256,
    read_csv,
    read_json,
    read_json_object,
    save_tensors,
    write_csv,
    write_json,
)
from livar_merge.errors import ArtifactError, RunReadError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "sub" / "metrics.csv"
    write_csv(target, [{"round": 1, "test_accuracy": 0.5}])
    before = target.read_bytes()

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("round,test_acc")  # a partial file under the temporary name
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.csv"]


def test_json_and_csv_round_trip_with_numpy_values(tmp_path: Path):
    data = {"a": np.float32(0.25), "b": np.arange(3), "c": tmp_path, "d": [np.int64(4)]}
    path = write_json(tmp_path / "x.json", data)
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {
        "a": 0.25,
        "b": [0, 1, 2],
        "c": str(tmp_path),
        "d": [4],
    }
    rows = [{"round": r, "loss": 1.0 / r} for r in (1, 2, 3)]
    write_csv(tmp_path / "rows.csv", rows)
    # the same bytes as pandas writes directly (run folders written before stay comparable)
    expected = tmp_path / "direct.csv"
    pd.DataFrame(rows).to_csv(expected, index=False)
    assert (tmp_path / "rows.csv").read_bytes() == expected.read_bytes()
    frame = pd.DataFrame({"x": [1, 2]}, index=pd.Index(["a", "b"], name="client"))
    write_csv(tmp_path / "indexed.csv", frame, index=True)
    assert (tmp_path / "indexed.csv").read_text().splitlines() == ["client,x", "a,1", "b,2"]


def test_file_sha256_matches_hashlib_across_chunks(tmp_path: Path):
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 12345)  # > 3 chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_save_tensors_round_trip(tmp_path: Path):
    import torch
    from safetensors import safe_open

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_tensors(tmp_path / "t.safetensors", tensors, {"round": "3"})
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["round"] == "3"
        assert torch.equal(handle.get_tensor("w"), tensors["w"])


def test_reads_name_the_file_and_what_is_wrong(tmp_path: Path):
    with pytest.raises(RunReadError, match=r"missing\.json is missing"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RunReadError, match=r"bad\.json is not readable JSON"):
        read_json(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"list\.json holds a JSON list, not an object"):
        read_json_object(listed, ArtifactError)
    csv = tmp_path / "m.csv"
    csv.write_text("round,loss\n1,0.5\n")
    assert read_csv(csv, ("round",))["loss"].tolist() == [0.5]
    with pytest.raises(RunReadError, match=r"m\.csv lacks column\(s\) \['test_accuracy'\]"):
        read_csv(csv, ("round", "test_accuracy"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(RunReadError, match=r"empty\.csv is not a readable CSV"):
        read_csv(empty)
