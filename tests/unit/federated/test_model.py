"""Backbone weights from files and the Hugging Face cache (livar_merge.federated.model)."""

import pickle
from pathlib import Path

import pytest
import torch

from livar_merge.errors import ConfigError
from livar_merge.federated.model import create_backbone


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_from_files_and_no_hub(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model, description, _ = create_backbone(
            "vit_tiny_patch16_224", 3, weights=str(tmp_path / name)
        )
        assert description == f"file:{(tmp_path / name).resolve()}"
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        assert loaded["head.weight"].shape == (3, 192)  # new head for 3 classes
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"x": evil}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    # torch refuses the pickle (UnpicklingError); timm 1.0.31 re-raises it as a RuntimeError
    with pytest.raises((RuntimeError, pickle.UnpicklingError), match="(?i)weights_only"):
        create_backbone("vit_tiny_patch16_224", 3, weights=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    arch = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.raises(
        ConfigError, match=r"architecture overrides \[.*'depth'.*\] need weights='random'"
    ):
        create_backbone(
            "vit_tiny_patch16_224",
            3,
            weights=str(tmp_path / "w.safetensors"),
            image_size=16,
            overrides=arch,
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", 3, weights=str(tmp_path / "missing.pth"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        create_backbone("vit_tiny_patch16_224", 3, weights="hf-cache", image_size=16)
    with pytest.warns(RuntimeWarning, match="random initialisation"):
        _, description, _ = create_backbone(
            "vit_tiny_patch16_224", 3, weights="auto", image_size=16
        )
    assert description.startswith("random")
    # A model in the Hugging Face cache layout is found without any network access.
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    cache = tmp_path / "empty-hf" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("abc123")
    (cache / "snapshots" / "abc123").mkdir(parents=True)
    save_file(state, str(cache / "snapshots" / "abc123" / "model.safetensors"))
    model, description, _ = create_backbone("vit_tiny_patch16_224", 3, weights="hf-cache")
    assert description.startswith("hf-cache:") and description.endswith("model.safetensors")
    assert torch.equal(
        model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"]
    )
