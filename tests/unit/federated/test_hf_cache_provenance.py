"""Weights from the local Hugging Face cache (``--weights hf-cache``/``auto``) carry provenance:
the hub id, the snapshot revision and the sha256 of the cached checkpoint, so that W0 can be
verified. The cache is a fake one in tmp_path, in the hub cache layout (blob + snapshot link)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import pytest

from livar_merge.federated.model import build_model

MODEL = "test_vit.r160_in1k"  # timm's test ViT (300k parameters), hub id timm/test_vit.r160_in1k
HUB_ID = "timm/test_vit.r160_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path) -> Path:
    """A hub cache under ``root`` holding a timm checkpoint of :data:`MODEL` (random weights)
    as ``models--timm--<name>/snapshots/<rev>/model.safetensors`` -> ``blobs/<sha256>``;
    returns the snapshot file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model(MODEL, pretrained=False).state_dict()
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    staged = repo / "blobs" / "staged"
    save_file({k: v.contiguous() for k, v in state.items()}, str(staged))
    blob = repo / "blobs" / hashlib.sha256(staged.read_bytes()).hexdigest()
    staged.rename(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    return snapshot / "model.safetensors"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """The fake cache as the Hugging Face cache of this process (read by huggingface_hub)."""
    root = tmp_path / "hf" / "hub"
    checkpoint = fake_hub_cache(root)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return checkpoint


@pytest.mark.parametrize("weights", ["hf-cache", "auto"])
def test_cached_weights_record_hub_id_revision_and_sha256(hub_cache, weights):
    _, info = build_model(MODEL, 3, weights=weights, image_size=32, rank=2, alpha=2.0)
    expected_sha = hashlib.sha256(hub_cache.read_bytes()).hexdigest()
    assert info.weights == f"hf-cache:{hub_cache}"
    record = info.weights_provenance
    assert record is not None
    assert record["source"] == "hf-cache" and record["hub_id"] == HUB_ID
    assert record["revision"] == REVISION and record["filename"] == "model.safetensors"
    assert record["sha256"] == expected_sha
    assert Path(record["path"]) == hub_cache


def test_random_weights_have_no_provenance():
    _, info = build_model(MODEL, 3, weights="random", image_size=32, rank=2, alpha=2.0)
    assert info.weights == "random" and info.weights_provenance is None


@pytest.mark.slow
def test_export_records_the_cached_checkpoint(hub_cache, tmp_path):
    import json

    from livar_merge.apps.export import ExportOptions, export_run
    from livar_merge.apps.export.source import REPORT_FILE, sidecar_path
    from livar_merge.engines.inprocess import run_federated
    from tests.helpers import tiny

    arch = dict.fromkeys(("patch_size", "embed_dim", "depth", "num_heads"))  # the model's own
    small = {"max_train": 90, "max_test": 30, "rounds": 1, "lora_merge": "factors"}
    config = tiny(model=MODEL, weights="hf-cache", image_size=32, **small, **arch)
    run_federated(config, tmp_path / "run")
    expected = hashlib.sha256(hub_cache.read_bytes()).hexdigest()
    written = {}
    for fmt, out in (("peft", tmp_path / "adapter"), ("timm", tmp_path / "model.safetensors")):
        export_run(tmp_path / "run", fmt, out, ExportOptions(check_samples=16), say=lambda _: None)
        report = out / REPORT_FILE if fmt == "peft" else sidecar_path(out)
        written[fmt] = json.loads(report.read_text())
        record = written[fmt]["run"]["weights_provenance"]
        assert record["hub_id"] == HUB_ID and record["revision"] == REVISION
        assert record["sha256"] == expected
    # peft: W0 is timm's own checkpoint, not written; its hub id and sha256 are named instead
    base = written["peft"]["base"]
    assert base["file"] is None and expected in base["how"] and HUB_ID in base["how"]
