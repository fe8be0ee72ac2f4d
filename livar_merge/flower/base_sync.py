"""The frozen weights of ``product`` mode on the wire: the full base once, then round updates.

In ``product`` mode (Eq. 3 exactly) every round's merged update ``dW_r = sum_m alpha_m s B_m A_m``
is folded into the frozen weights of the LoRA layers, so the global model changes in the
frozen weights (about 85 M floats for ViT-B/16), not only in LoRA and head. A node that holds
the global model of version ``h`` (the number of rounds folded in) does not need it again:

* the server sends it the updates ``dW_{h+1}, ..., dW_v`` (``base-update`` ArrayRecord), each
  layer as the merged stacked factors ``B [d, R], A [R, k]`` and the scaling, or dense
  ``[d, k]``, whichever is smaller; the node folds them in round order with the server's own
  arithmetic (:meth:`~livar_merge.lora.LoraDelta.to_dense`, then
  :func:`~livar_merge.federated.model.fold_into_base`), so its weights equal the server's bit
  for bit, which a SHA-256 of the frozen weights of the LoRA layers (``base-checksum``) checks;
* a node the server knows nothing of (first round, joined late, lost its state, a reply that
  did not confirm the version) or whose updates would be larger than the weights themselves
  receives the full frozen weights (``base/...`` in ``arrays``), once;
* the node keeps them in its ``context.state`` (``livar-base``) and confirms the version it
  holds in every reply (info ``base-version``, ``base-checksum``); ClientApps that do not
  (custom ones) always receive the full weights.

Message config keys: ``base-to`` (the version the message's model has), ``base-from`` (the
version the updates start from; absent with the full weights), ``base-checksum``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from livar_merge.errors import NodeConfigError
from livar_merge.federated.model import fold_into_base
from livar_merge.flower.messages import from_array_record, to_array_record
from livar_merge.lora import LoraDelta

BASE_UPDATE = "base-update"  # ArrayRecord of the round updates in a message
BASE_STATE, BASE_STATE_INFO = "livar-base", "livar-base-info"  # a node's context.state keys
_UPDATE_KEY = re.compile(r"^(?P<round>\d+)/(?P<layer>.+)/(?P<part>B|A|scaling|dense)$")


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights of the LoRA layers, ``{base/<parameter name>: tensor}`` (the
    ``base/`` entries of :func:`~livar_merge.federated.peft_keys.global_tensors`)."""
    return {
        f"base/{name}": param for name, param in model.named_parameters() if ".base_layer." in name
    }


def base_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen weights of the LoRA layers (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, param in base_parameters(model).items():
        digest.update(key.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def wire_delta(delta: LoraDelta) -> dict[str, torch.Tensor]:
    """One layer's update as sent: ``{"B", "A", "scaling"}`` when the factors are smaller than
    the dense ``[d, k]`` update, else ``{"dense"}`` (the dense update the server folds)."""
    if delta.dense is None and delta.B is not None and delta.A is not None:
        d, k = delta.B.shape[0], delta.A.shape[1]
        if delta.B.numel() + delta.A.numel() < d * k:
            scaling = torch.tensor([delta.scaling], dtype=torch.float64)
            return {"B": delta.B, "A": delta.A, "scaling": scaling}
    return {"dense": delta.to_dense()}


def update_tensors(updates: Mapping[int, Mapping[str, LoraDelta]]) -> dict[str, torch.Tensor]:
    """The ``base-update`` tensors of rounds ``updates`` (``{round: {layer: delta}}``), keyed
    ``<round>/<layer>/<B|A|scaling|dense>``."""
    tensors: dict[str, torch.Tensor] = {}
    for round_index in sorted(updates):
        for layer, delta in updates[round_index].items():
            for part, value in wire_delta(delta).items():
                tensors[f"{round_index}/{layer}/{part}"] = value.detach().contiguous().cpu()
    return tensors


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_bytes(content: RecordDict) -> int:
    """Array payload bytes of a message (every ArrayRecord; configs and metrics are small)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
    return total


def parse_update(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, LoraDelta]]:
    """Inverse of :func:`update_tensors`; :class:`NodeConfigError` for a malformed key, a
    layer with parts missing, or NaN/Inf."""
    parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        match = _UPDATE_KEY.match(key)
        if match is None:
            raise NodeConfigError(f"base update key {key!r} is not <round>/<layer>/<part>")
        if not bool(torch.isfinite(value).all()):
            raise NodeConfigError(f"base update {key!r} holds NaN/Inf")
        layer_parts = parts.setdefault(int(match["round"]), {}).setdefault(match["layer"], {})
        layer_parts[match["part"]] = value
    deltas: dict[int, dict[str, LoraDelta]] = {}
    for round_index, layers in parts.items():
        for layer, got in layers.items():
            if set(got) == {"dense"}:
                delta = LoraDelta(scaling=1.0, dense=got["dense"])
            elif set(got) == {"B", "A", "scaling"}:
                delta = LoraDelta(scaling=float(got["scaling"][0]), B=got["B"], A=got["A"])
            else:
                raise NodeConfigError(
                    f"base update of round {round_index}, layer {layer!r} has parts "
                    f"{sorted(got)}; expected dense or B, A, scaling"
                )
            deltas.setdefault(round_index, {})[layer] = delta
    return deltas


@torch.no_grad()
def fold_updates(model: torch.nn.Module, updates: Mapping[int, Mapping[str, LoraDelta]]) -> None:
    """Fold the round updates into the frozen weights in round order, as the server did."""
    modules = dict(model.named_modules())
    for round_index in sorted(updates):
        for layer, delta in updates[round_index].items():
            weight = getattr(modules.get(layer), "base_layer", None)
            shape = None if delta.dense is None else tuple(delta.dense.shape)
            if delta.B is not None and delta.A is not None:
                shape = (delta.B.shape[0], delta.A.shape[1])
            if weight is None or tuple(weight.weight.shape) != shape:
                raise NodeConfigError(
                    f"base update of round {round_index}: layer {layer!r} is not a LoRA layer "
                    f"of shape {shape} in this model"
                )
        fold_into_base(model, {layer: d.to_dense() for layer, d in updates[round_index].items()})


# ------------------------------------------------------------------------------ node side
def sync_node_base(
    model: torch.nn.Module, content: RecordDict, config: ConfigRecord, state: RecordDict
) -> dict[str, int | str] | None:
    """Bring ``model``'s frozen LoRA-layer weights to the message's version, after the
    message's ``arrays`` were loaded (which set them when the message carries the full weights).

    Uses the node's ``state`` (the weights it kept) and the message's updates; checks the
    checksum; keeps the result in ``state``. Returns the info a reply confirms
    (``{"base-version", "base-checksum"}``), or None for a message without ``base-to``.
    Raises :class:`NodeConfigError` when the node does not hold the version the updates start
    from, or the result differs from the server's (the server then sends the full weights).
    """
    if "base-to" not in config:
        return None
    target = int(str(config["base-to"]))
    expected = str(config.get("base-checksum", ""))
    info = state.get(BASE_STATE_INFO)
    held = int(str(info["version"])) if isinstance(info, ConfigRecord) else None
    if "base-from" in config:  # not the full weights: start from those the node kept
        start = int(str(config["base-from"]))
        kept = state.get(BASE_STATE)
        if held != start or not isinstance(kept, ArrayRecord):
            raise NodeConfigError(
                f"the message updates the frozen weights from version {start}, but this node "
                f"holds {'none' if held is None else f'version {held}'}"
            )
        params = base_parameters(model)
        for key, array in kept.items():
            params[key].copy_(torch.from_numpy(np.asarray(array.numpy())))
        update = content.get(BASE_UPDATE)
        if isinstance(update, ArrayRecord):
            fold_updates(model, parse_update(from_array_record(update)))
    checksum = base_checksum(model)
    if expected and checksum != expected:
        state.pop(BASE_STATE, None)
        state.pop(BASE_STATE_INFO, None)
        raise NodeConfigError(
            f"frozen weights of version {target} differ from the server's ({checksum[:19]}... "
            f"vs {expected[:19]}...); the server sends the full weights next time"
        )
    if held != target:
        state[BASE_STATE] = to_array_record(base_parameters(model))
        state[BASE_STATE_INFO] = ConfigRecord({"version": target, "checksum": checksum})
    return {"base-version": target, "base-checksum": checksum}
