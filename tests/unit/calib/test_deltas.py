"""Saving and loading a repeat's deltas (livar_calib.deltas)."""

from __future__ import annotations

import numpy as np
import pytest

from livar_calib.deltas import CalibrationError, load_repeat, save_repeat
from tests.helpers import random_repeat


def test_save_load_repeat_round_trip(tmp_path, rng):
    deltas = random_repeat(
        rng, "beta0.1/seed3:r2", clients=["c/0", "c 1", "ü"], layers=["blocks.0.attn.qkv", "fc"]
    )
    deltas.client_factors["fc"][1] = tuple(
        f.astype(np.float32) for f in deltas.client_factors["fc"][1]
    )
    path = save_repeat(tmp_path / "sub" / "round_1.safetensors", deltas)
    assert sorted(p.name for p in path.parent.iterdir()) == ["round_1.safetensors"]  # no tmp left
    back = load_repeat(path)
    assert (back.repeat_id, back.layers, back.clients) == (
        deltas.repeat_id,
        deltas.layers,
        deltas.clients,
    )
    for layer in deltas.layers:
        for (u, v), (u2, v2) in zip(
            deltas.client_factors[layer], back.client_factors[layer], strict=True
        ):
            assert u2.dtype == u.dtype and np.array_equal(u, u2) and np.array_equal(v, v2)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(deltas.joint_factors[layer], back.joint_factors[layer], strict=True)
        )


def test_load_repeat_errors(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    deltas = random_repeat(rng, "r", clients=["a", "b"], layers=["l0", "l1"])
    path = save_repeat(tmp_path / "good.safetensors", deltas)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CalibrationError, match="truncated.safetensors"):
        load_repeat(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CalibrationError, match="garbage.safetensors.*not a readable"):
        load_repeat(garbage)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    missing = dict(tensors)
    del missing["client/1/l1/V"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(
        CalibrationError, match=r"missing.safetensors: missing tensor 'client/1/l1/V'"
    ):
        load_repeat(tmp_path / "missing.safetensors")
    bad_shape = dict(tensors)
    bad_shape["client/0/l0/V"] = np.zeros((7, 3))
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(
        CalibrationError, match=r"shape.safetensors: tensors client/0/l0/U .*client/0/l0/V"
    ):
        load_repeat(tmp_path / "shape.safetensors")
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CalibrationError, match="nometa.safetensors: metadata format"):
        load_repeat(tmp_path / "nometa.safetensors")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_repeat(tmp_path / "absent.safetensors")
    deltas.client_factors["l0"] = deltas.client_factors["l0"][:1]
    with pytest.raises(CalibrationError, match="layer 'l0' needs 2 client factor pairs"):
        save_repeat(tmp_path / "never.safetensors", deltas)
    assert not (tmp_path / "never.safetensors").exists()
