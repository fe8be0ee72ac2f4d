"""A LoRA model's global state: what a checkpoint and the Flower broadcast carry.

Factor names are those of :mod:`livar_merge.lora_view` (peft's state-dict keys, the adapter
dropped). The global state of a run (checkpoint ``global.safetensors`` and the Flower
broadcast) uses::

    lora/<layer>.lora_A.weight   [r, k]   LoRA factors (adapter dropped)
    lora/<layer>.lora_B.weight   [d, r]
    head/weight, head/bias       [C, D], [C]
    base/<param>.base_layer.weight        the frozen weight of a LoRA layer (``product`` mode
                                          only, where every round's merge is folded into it)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from livar_merge.errors import GlobalStateError
from livar_merge.lora_view import head_module, is_base_parameter, lora_state, parameter_name

GLOBAL_KINDS = ("lora", "head", "base")


def global_tensors(model: torch.nn.Module, lora_merge: str) -> dict[str, torch.Tensor]:
    """The global state of a peft model (module docstring), contiguous CPU tensors."""
    head = head_module(model)
    tensors = {f"lora/{k}": v for k, v in lora_state(model).items()}
    tensors["head/weight"] = head.weight.detach()
    if head.bias is not None:
        tensors["head/bias"] = head.bias.detach()
    if lora_merge == "product":
        for name, param in model.named_parameters():
            if is_base_parameter(name):
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
