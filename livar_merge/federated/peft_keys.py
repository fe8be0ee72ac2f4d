"""peft key conventions and a LoRA model's global state: the one home of these names.

A peft model names its LoRA parameters with the adapter (``<layer>.lora_A.default.weight``);
``peft.get_peft_model_state_dict`` drops it (``<layer>.lora_A.weight``), and that is the name of
a LoRA factor everywhere in livar (``ClientUpdate.lora``, the Flower wire, checkpoints).

The global state of a run (checkpoint ``global.safetensors`` and the Flower broadcast) uses::

    lora/<layer>.lora_A.weight   [r, k]   LoRA factors (adapter dropped)
    lora/<layer>.lora_B.weight   [d, r]
    head/weight, head/bias       [C, D], [C]
    base/<param>.base_layer.weight        the frozen weight of a LoRA layer (``product`` mode
                                          only, where every round's merge is folded into it)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from livar_merge.errors import GlobalStateError
from livar_merge.federated.model import ADAPTER, head_module

GLOBAL_KINDS = ("lora", "head", "base")


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA factor."""
    return ".lora_A." in name or ".lora_B." in name


def lora_key(parameter_name: str, adapter: str = ADAPTER) -> str:
    """``<layer>.lora_A.default.weight`` -> ``<layer>.lora_A.weight`` (peft state-dict key)."""
    return parameter_name.replace(f".{adapter}.", ".")


def parameter_name(key: str, adapter: str = ADAPTER) -> str:
    """Inverse of :func:`lora_key`: ``<l>.lora_B.weight`` -> ``<l>.lora_B.default.weight``."""
    return key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA factors as ``get_peft_model_state_dict`` names them, as detached copies."""
    return {
        lora_key(name): param.detach().clone()
        for name, param in model.named_parameters()
        if is_lora_parameter(name)
    }


def global_tensors(model: torch.nn.Module, lora_merge: str) -> dict[str, torch.Tensor]:
    """The global state of a peft model (module docstring), contiguous CPU tensors."""
    head = head_module(model)
    tensors = {f"lora/{k}": v for k, v in lora_state(model).items()}
    tensors["head/weight"] = head.weight.detach()
    if head.bias is not None:
        tensors["head/bias"] = head.bias.detach()
    if lora_merge == "product":
        for name, param in model.named_parameters():
            if ".base_layer." in name:
                tensors[f"base/{name}"] = param.detach()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


@torch.no_grad()
def load_global_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors named as by :func:`global_tensors` into ``model``.

    Raises :class:`GlobalStateError` for a key that names no parameter or a shape that differs.
    """
    params = dict(model.named_parameters())
    head = head_module(model)
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        target: torch.Tensor | None = None
        if kind == "lora":
            target = params.get(parameter_name(name))
        elif kind == "base":
            target = params.get(name)
        elif kind == "head":
            target = getattr(head, name, None)
        if target is None:
            raise GlobalStateError(f"global model key {key!r} names no parameter of this model")
        if tuple(target.shape) != tuple(value.shape):
            raise GlobalStateError(
                f"global model key {key!r} has shape {tuple(value.shape)}, "
                f"the model's parameter has {tuple(target.shape)}"
            )
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def frozen_checksum(model: torch.nn.Module, lora_merge: str) -> str:
    """SHA-256 of the frozen parameters that are *not* part of the global state (in product
    mode the LoRA layers' frozen weights are). Server and clients compare it to catch another
    backbone (weights file, architecture, seed)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad or (lora_merge == "product" and ".base_layer." in name):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def check_lora_targets(model: torch.nn.Module, adapter: str = ADAPTER) -> tuple[str, ...]:
    """Check that ``model`` is a peft LoRA model whose global state this module can carry;
    returns its LoRA layers. Raises :class:`GlobalStateError` naming what is wrong: no
    ``adapter`` adapter or several adapters, no LoRA layer, a LoRA layer that is not a Linear
    (Eq. 3 merges ``B A`` into a ``[d, k]`` weight) or uses DoRA (its magnitude is not carried),
    frozen LoRA factors, or a head that is missing or not trainable."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or adapter not in peft_config:
        raise GlobalStateError(
            f"model is not a peft model with a LoRA adapter named {adapter!r} "
            "(build it with peft.get_peft_model(model, LoraConfig(...)))"
        )
    if len(peft_config) != 1:
        raise GlobalStateError(f"model has adapters {sorted(peft_config)}; expected one")
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not (isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a):
            continue
        base = getattr(module, "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            raise GlobalStateError(
                f"LoRA layer {name!r} wraps a {type(base).__name__}, not a Linear"
            )
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise GlobalStateError(f"LoRA layer {name!r} uses DoRA, which is not supported")
        for factor in (module.lora_A[adapter].weight, module.lora_B[adapter].weight):
            if not factor.requires_grad:
                raise GlobalStateError(f"LoRA layer {name!r} has frozen factors")
        layers.append(name)
    if not layers:
        raise GlobalStateError(f"model has no LoRA layer of adapter {adapter!r}")
    try:
        head = head_module(model)
    except AttributeError as err:
        raise GlobalStateError(
            f"model has no classification head at base_model.model.head (a timm model): {err}"
        ) from err
    if not isinstance(head, torch.nn.Linear) or not head.weight.requires_grad:
        raise GlobalStateError(
            "the head must be a trainable Linear (LoraConfig(modules_to_save=['head']))"
        )
    return tuple(layers)
