"""The frozen weights of ``product`` mode on the wire: the full base once, then round updates.

In ``product`` mode (Eq. 3 exactly) every round's merged update ``dW_r = sum_m alpha_m s B_m A_m``
is folded into the frozen weights of the LoRA layers, so the global model changes in the
frozen weights (about 85 M floats for ViT-B/16), not only in LoRA and head. A node that holds
the global model of version ``h`` (the number of rounds folded in) does not need it again:

* the server sends it the updates ``dW_{h+1}, ..., dW_v`` (``base-update`` ArrayRecord), each
  layer as the merged stacked factors ``B [d, R], A [R, k]`` and the scaling, or dense
  ``[d, k]``, whichever is smaller; the node folds them in round order with the server's own
  arithmetic (:meth:`~livar_merge.lora.LoraDelta.to_dense`, whose
  :func:`~livar_merge.lora.exact_product` gives the same bits on any CPU, GPU, BLAS kernel or
  thread count, then :func:`~livar_merge.lora_view.fold_into_base`, an element-wise add), so
  its weights equal the server's bit for bit, which a SHA-256 of the frozen weights of the
  LoRA layers (``base-checksum``) checks;
* a node that cannot (its result differs from the server's, or it lost the version the
  updates start from) does not train: it replies a request for the full weights
  (:func:`resync_reply`, info ``base-resync``), and the server sends them to it within the
  same round (:meth:`~livar_merge.flower.download.GlobalDownload.recover`); a node whose fold
  differed is sent the full weights for the rest of the run (``BaseSync.full_only``);
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
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from livar_merge.errors import InvalidReplyError, NodeConfigError
from livar_merge.flower.messages import ARRAYS, CONFIG, INFO, from_array_record, to_array_record
from livar_merge.lora import LoraDelta
from livar_merge.lora_view import base_parameters as frozen_base_parameters
from livar_merge.lora_view import base_weight, fold_into_base, lora_layers

if TYPE_CHECKING:
    from livar_merge.federated.server import FederatedServer

BASE_UPDATE = "base-update"  # ArrayRecord of the round updates in a message
BASE_STATE, BASE_STATE_INFO = "livar-base", "livar-base-info"  # a node's context.state keys
RESYNC = "base-resync"  # info key of a node's request for the full frozen weights
_UPDATE_KEY = re.compile(r"^(?P<round>\d+)/(?P<layer>.+)/(?P<part>B|A|scaling|dense)$")


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights of the LoRA layers, ``{base/<parameter name>: tensor}`` (the
    ``base/`` entries of :func:`~livar_merge.federated.global_state.global_tensors`)."""
    return {f"base/{name}": param for name, param in frozen_base_parameters(model).items()}


def base_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen weights of the LoRA layers (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, param in base_parameters(model).items():
        digest.update(key.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _sends_factors(delta: LoraDelta) -> bool:
    """Whether ``delta`` travels as factors: it has them and they are smaller than ``[d, k]``."""
    if delta.dense is not None or delta.B is None or delta.A is None:
        return False
    return delta.B.numel() + delta.A.numel() < delta.B.shape[0] * delta.A.shape[1]


def wire_delta(delta: LoraDelta) -> dict[str, torch.Tensor]:
    """One layer's update as sent: ``{"B", "A", "scaling"}`` when the factors are smaller than
    the dense ``[d, k]`` update, else ``{"dense"}`` (the dense update the server folds)."""
    if _sends_factors(delta):
        assert delta.B is not None and delta.A is not None
        scaling = torch.tensor([delta.scaling], dtype=torch.float64)
        return {"B": delta.B, "A": delta.A, "scaling": scaling}
    return {"dense": delta.to_dense()}


def wire_bytes(deltas: Mapping[str, LoraDelta]) -> int:
    """Payload bytes of one round's update as :func:`wire_delta` sends it, without forming it."""
    total = 0
    for delta in deltas.values():
        if _sends_factors(delta):
            assert delta.B is not None and delta.A is not None
            total += delta.B.numel() * delta.B.element_size() + 8  # + the float64 scaling
            total += delta.A.numel() * delta.A.element_size()
        elif delta.dense is not None:
            total += delta.dense.numel() * delta.dense.element_size()
        else:
            assert delta.B is not None and delta.A is not None
            total += delta.B.shape[0] * delta.A.shape[1] * delta.B.element_size()
    return total


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
    layers = lora_layers(model)
    for round_index in sorted(updates):
        for layer, delta in updates[round_index].items():
            module = layers.get(layer)
            shape = None if delta.dense is None else tuple(delta.dense.shape)
            if delta.B is not None and delta.A is not None:
                shape = (delta.B.shape[0], delta.A.shape[1])
            if module is None or tuple(base_weight(module).shape) != shape:
                raise NodeConfigError(
                    f"base update of round {round_index}: layer {layer!r} is not a LoRA layer "
                    f"of shape {shape} in this model"
                )
        fold_into_base(model, {layer: d.to_dense() for layer, d in updates[round_index].items()})


# ------------------------------------------------------------------------------ node side
class BaseResync(NodeConfigError):
    """The node cannot bring its frozen weights to the message's version and asks for them in
    full: its fold gave other bits than the server's (``cannot_fold``), or it does not hold the
    version the updates start from (restarted, lost its state)."""

    def __init__(self, message: str, *, cannot_fold: bool) -> None:
        super().__init__(message)
        self.cannot_fold = cannot_fold


def resync_reply(error: BaseResync) -> RecordDict:
    """A node's reply asking for the full frozen weights instead of training (or answering)."""
    kind = "mismatch" if error.cannot_fold else "missing"
    return RecordDict({INFO: ConfigRecord({RESYNC: kind, "reason": str(error)})})


def resync_request(content: RecordDict) -> tuple[bool, str] | None:
    """``(cannot_fold, reason)`` of a reply asking for the full weights, else None."""
    info = content.get(INFO)
    if not isinstance(info, ConfigRecord) or RESYNC not in info:
        return None
    kind = info[RESYNC]
    if kind not in ("mismatch", "missing"):
        raise InvalidReplyError(f"base-resync request of unknown kind {kind!r}")
    return kind == "mismatch", str(info.get("reason", ""))


def sync_node_base(
    model: torch.nn.Module, content: RecordDict, config: ConfigRecord, state: RecordDict
) -> dict[str, int | str] | None:
    """Bring ``model``'s frozen LoRA-layer weights to the message's version, after the
    message's ``arrays`` were loaded (which set them when the message carries the full weights).

    Uses the node's ``state`` (the weights it kept) and the message's updates; checks the
    checksum; keeps the result in ``state``. Returns the info a reply confirms
    (``{"base-version", "base-checksum"}``), or None for a message without ``base-to``.
    Raises :class:`BaseResync` when the node does not hold the version the updates start
    from, or the result differs from the server's (the node then asks for the full weights).
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
            raise BaseResync(
                f"the message updates the frozen weights from version {start}, but this node "
                f"holds {'none' if held is None else f'version {held}'}",
                cannot_fold=False,
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
        raise BaseResync(
            f"frozen weights of version {target} differ from the server's ({checksum[:19]}... "
            f"vs {expected[:19]}...)",
            cannot_fold="base-from" in config,
        )
    if held != target:
        state[BASE_STATE] = to_array_record(base_parameters(model))
        state[BASE_STATE_INFO] = ConfigRecord({"version": target, "checksum": checksum})
    return {"base-version": target, "base-checksum": checksum}


class BaseSync:
    """The server's side of the frozen-weight versions of ``product`` mode.

    ``version``: the number of rounds folded into the global frozen weights since the run (or
    the last model loaded from elsewhere) began; ``updates[v]``: the merged update that
    reached version ``v``; ``node_versions[node]``: the version a node last confirmed;
    ``full_only[node]``: why a node whose fold differed from the server's is sent the full
    weights for the rest of the run. Every
    method first reads the server's last install (``FederatedServer.last_install``), so the
    three stay in step without the caller registering installs. Outside ``product`` mode the
    frozen weights never change: every node gets the full global model.
    """

    def __init__(self, server: FederatedServer) -> None:
        self.server = server
        self.enabled = server.lora_merge == "product"
        self._version = 0
        self._updates: dict[int, Mapping[str, LoraDelta]] = {}
        self._sizes: dict[int, int] = {}  # wire bytes of each kept update
        self._base_bytes: int | None = None  # of the frozen weights of the LoRA layers
        self.node_versions: dict[int, int] = {}
        self.full_only: dict[int, str] = {}
        self._registered_round: int | None = None
        self._checksum: tuple[int, str] | None = None

    @property
    def version(self) -> int:
        """The version of the server's frozen weights now."""
        self.refresh()
        return self._version

    @property
    def updates(self) -> Mapping[int, Mapping[str, LoraDelta]]:
        """The merged update that reached each version (read-only)."""
        self.refresh()
        return self._updates

    def refresh(self) -> None:
        """A round the server installed since the last call is one more version, reached by
        that round's merged update; updates no node can use any more are released."""
        installed = self.server.last_install
        if self.enabled and installed is not None and installed[0] != self._registered_round:
            self._registered_round = installed[0]
            self._version += 1
            self._updates[self._version] = installed[1]
            self._sizes[self._version] = wire_bytes(installed[1])
            self._prune()

    def _prune(self) -> None:
        """Keep the updates after the oldest version a node holds, and of those only the newest
        whose wire size adds up to less than the frozen weights (a node further behind is sent
        the weights): the memory stays bounded however many rounds run."""
        if self._base_bytes is None:
            self._base_bytes = tensor_bytes(base_parameters(self.server.model))
        oldest = min(self.node_versions.values(), default=self._version)
        total, keep = 0, set()
        for version in sorted(self._updates, reverse=True):
            total += self._sizes[version]
            if version <= oldest or total >= self._base_bytes:
                break
            keep.add(version)
        for version in [v for v in self._updates if v not in keep]:
            del self._updates[version], self._sizes[version]

    def reset(self) -> None:
        """The server's model was replaced from outside: no node holds its frozen weights."""
        self.refresh()
        self._version += 1
        self._updates.clear()
        self._sizes.clear()
        self.node_versions.clear()

    def checksum(self) -> str:
        """SHA-256 of the server's frozen LoRA-layer weights (cached per version)."""
        self.refresh()
        if self._checksum is None or self._checksum[0] != self._version:
            self._checksum = (self._version, base_checksum(self.server.model))
        return self._checksum[1]

    def confirm(self, node: int, content: RecordDict | None) -> None:
        """Record the version a reply confirms (info ``base-version`` and ``base-checksum``
        of the current version); forget the node otherwise."""
        info = content.get(INFO) if content is not None else None
        version = info.get("base-version") if isinstance(info, ConfigRecord) else None
        checksum = info.get("base-checksum") if isinstance(info, ConfigRecord) else None
        if self.enabled and version == self.version and checksum == self.checksum():
            self.node_versions[node] = self.version
        else:
            self.node_versions.pop(node, None)

    def forget(self, node: int) -> None:
        """A node whose state is unknown (error reply or none) gets the full weights next."""
        self.node_versions.pop(node, None)

    def resync(self, node: int, *, cannot_fold: bool, reason: str) -> None:
        """A node asked for the full weights; one whose fold differed gets them from now on."""
        self.forget(node)
        if cannot_fold:
            self.full_only[node] = reason

    def contents(
        self,
        nodes: list[int] | tuple[int, ...],
        arrays: ArrayRecord,
        config: ConfigRecord,
        extra: Mapping[str, ArrayRecord],
    ) -> dict[int, RecordDict]:
        """Each node's message content: the global model ``arrays`` and ``config`` (plus
        ``extra`` records); in ``product`` mode a node that confirmed an earlier version whose
        updates since are smaller than the frozen weights gets LoRA, head and those updates
        instead of the frozen weights (one content per starting version)."""
        self.refresh()
        if not self.enabled:
            return dict.fromkeys(nodes, RecordDict({ARRAYS: arrays, CONFIG: config, **extra}))
        version, checksum = self.version, self.checksum()
        light_keys = {k for k in arrays if not k.startswith("base/")}
        base_bytes = sum(len(a.data) for k, a in arrays.items() if k not in light_keys)
        settings = {k: v for k, v in config.items() if k not in ("base-from", "base-to")}
        settings |= {"base-to": version, "base-checksum": checksum}
        full = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(settings), **extra})
        light = ArrayRecord({k: arrays[k] for k in arrays if k in light_keys})
        by_start: dict[int, RecordDict] = {}  # one content per version a node holds
        out: dict[int, RecordDict] = {}
        for node in nodes:
            held = self.node_versions.get(node)
            missing = held is None or any(
                r not in self.updates for r in range(held + 1, version + 1)
            )
            if held is None or missing or node in self.full_only:
                out[node] = full
                continue
            if held not in by_start:
                missed = {r: self.updates[r] for r in range(held + 1, version + 1)}
                tensors = update_tensors(missed)
                by_start[held] = full  # the updates are not smaller than the weights
                if tensor_bytes(tensors) < base_bytes:
                    by_start[held] = RecordDict(
                        {
                            ARRAYS: light,
                            BASE_UPDATE: to_array_record(tensors),
                            CONFIG: ConfigRecord({**settings, "base-from": held}),
                            **extra,
                        }
                    )
            out[node] = by_start[held]
        return out
