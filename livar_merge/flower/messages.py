"""Wire format of LIVAR on Flower: the broadcast global model and a client's reply.

Tensor keys of the global model and of a reply are those of
:mod:`livar_merge.federated.global_state` (``lora/...``, ``head/...``; ``base/...`` only in the
broadcast global model, in ``product`` mode).

Baselines' client statistics travel in the reply's ``arrays`` too (float64), only when the method
needs them::

    gram/<layer>                 [k, k]   RegMean: input Gram of a LoRA Linear
    head-gram                    [D+1, D+1]  RegMean: Gram of the head's inputs with a 1 appended
    fisher/<lora key or head.weight/head.bias>  diagonal Fisher, the shape of the parameter
    proto-mean, proto-count      [C, D], [C]  FedProto: class-mean features (NaN rows for classes
                                              the client has no sample of) and counts

What the method broadcasts (``Aggregator.broadcast``: FedProto's global prototypes,
``prototypes [C, D]``) goes to clients as a ``broadcast`` ArrayRecord in the train message,
one array per name. CCVR asks, after each aggregation, for class feature moments under the new
global model with a QUERY message (``arrays``: the global model, ``config``); the reply holds
``moments`` (ArrayRecord ``mean [C, D]``, ``cov [C, D, D]`` or ``[C, D]``, ``count [C]``) and
``info`` (``protocol``, ``client-id``, ``partition-id``).

A train reply is a RecordDict with three records:

``arrays``  (ArrayRecord)   the client's LoRA factors and head after local training, and the
                            method's statistics above;
``metrics`` (MetricRecord)  ``num-examples``; ``omega-a``/``omega-b`` (one value per layer, in
                            the order of ``layer-names``) when the method needs omega;
                            ``class-sigma`` (0 where absent), ``class-present`` (0/1) and
                            ``class-counts`` (one value per class) when it needs sigma;
                            ``train-*`` metrics of the client's TrainReport (``train-loss``,
                            ``train-seconds``, ``train-upload-bytes``, ...);
``info``    (ConfigRecord)  ``protocol``, ``client-id``, ``partition-id``, ``layer-names``,
                            ``config-hash`` and the G_SHAP table identity ``table-name``,
                            ``table-version``, ``table-checksum``; ``lora-scaling`` (the
                            client's own peft scaling ``lora_alpha / r_m``) when the update
                            has one (``ClientUpdate.scaling``, runs with ``client_ranks``).

With mixed client ranks (``ReplySpec.mixed_ranks``) a reply's LoRA factors may have another
rank ``r_m`` than the global model's (``B [d, r_m]``, ``A [r_m, k]``, the global ``d`` and
``k``); a reply of another rank must carry its ``lora-scaling``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from livar_merge.aggregation import ClientUpdate
from livar_merge.aggregation.needs import EXTRA_FIELDS, wire_field
from livar_merge.aggregation.types import UpdateOrigin
from livar_merge.errors import InvalidReplyError
from livar_merge.lora_view import factor_key, is_factor_b, is_lora_parameter, parse_factor_key

PROTOCOL = 1
ARRAYS, METRICS, INFO, CONFIG = "arrays", "metrics", "info", "config"
# BROADCAST: the ArrayRecord of what the method sends with a train message (Aggregator.broadcast)
BROADCAST, MOMENTS = "broadcast", "moments"
SCALING = "lora-scaling"  # info key of a client's own peft LoRA scaling (mixed ranks)
MOMENT_KEYS = ("mean", "cov", "count")
TABLE_KEYS = ("name", "version", "checksum")

RecordT = TypeVar("RecordT", ArrayRecord, MetricRecord, ConfigRecord)


# ---------------------------------------------------------------------------- typed access
def get_record(content: RecordDict, key: str, kind: type[RecordT]) -> RecordT | None:
    """``content[key]`` when it is a ``kind`` record, else None (missing or another kind)."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def _typed_record(content: RecordDict, key: str, kind: type[RecordT]) -> RecordT:
    """``content[key]`` (``KeyError`` when missing), :class:`InvalidReplyError` when it is not
    a ``kind`` record."""
    record = content[key]
    if not isinstance(record, kind):
        raise InvalidReplyError(
            f"record {key!r} is a {type(record).__name__}, expected a {kind.__name__}"
        )
    return record


def _int_value(value: object, what: str) -> int:
    """``int(value)`` of a record's scalar; :class:`InvalidReplyError` for a list."""
    if not isinstance(value, int | float | str | bytes):
        raise InvalidReplyError(f"{what} is a {type(value).__name__}, expected a number")
    return int(value)


def _float_value(value: object, what: str) -> float:
    """``float(value)`` of a record's scalar; :class:`InvalidReplyError` for a list."""
    if not isinstance(value, int | float | str | bytes):
        raise InvalidReplyError(f"{what} is a {type(value).__name__}, expected a number")
    try:
        return float(value)
    except ValueError as err:
        raise InvalidReplyError(f"{what} is {value!r}, expected a number") from err


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    """A record's list of strings as a tuple; :class:`InvalidReplyError` for anything else."""
    if not isinstance(value, list):
        raise InvalidReplyError(f"{what} is a {type(value).__name__}, expected a list of strings")
    names = tuple(v for v in value if isinstance(v, str))
    if len(names) != len(value):
        raise InvalidReplyError(f"{what} holds values other than strings")
    return names


# ------------------------------------------------------------------------------ arrays
def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of CPU numpy copies (dtype and shape kept exactly)."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()}
    )


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors of an ArrayRecord, in its key order."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


# -------------------------------------------------------------------------------- the reply
def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).ravel()]


def pack_reply(
    update: ClientUpdate,
    *,
    partition_id: int,
    table: Mapping[str, Any],
    config_hash: str,
    train_metrics: Mapping[str, float | int] | None = None,
) -> RecordDict:
    """The RecordDict a ClientApp sends for ``update`` (see the module docstring).

    ``train_metrics`` (``train-loss``, ...) default to the update's ``report``
    (:meth:`~livar_merge.federated.client.TrainReport.metrics`)."""
    unknown = sorted(set(update.extras) - EXTRA_FIELDS.keys())
    if unknown:
        raise InvalidReplyError(
            f"client {update.client_id!r}: ClientUpdate.extras holds {unknown}, which are no "
            f"client statistics ({sorted(EXTRA_FIELDS)}); a training report (train_loss, ...) "
            "goes in ClientUpdate.report"
        )
    tensors = {f"lora/{k}": v for k, v in update.lora.items()}
    tensors["head/weight"] = update.head_weight
    if update.head_bias is not None:
        tensors["head/bias"] = update.head_bias
    tensors.update(statistics_tensors(update.extras))
    metrics = MetricRecord({"num-examples": int(update.num_samples)})
    if update.omega_a is not None and update.omega_b is not None:
        metrics["omega-a"] = _floats(update.omega_a)
        metrics["omega-b"] = _floats(update.omega_b)
    if update.class_sigma is not None:
        present = np.asarray(update.class_present, dtype=bool)
        sigma = np.where(present, np.asarray(update.class_sigma, dtype=np.float64), 0.0)
        metrics["class-sigma"] = _floats(sigma)
        metrics["class-present"] = _ints(present.astype(np.int64))
        metrics["class-counts"] = _ints(update.class_counts)
    if train_metrics is None:
        train_metrics = {
            key.replace("_", "-"): value
            for key, value in update.report.items()
            if key.startswith("train_") and isinstance(value, int | float)
        }
    for key, value in train_metrics.items():
        metrics[key] = value
    info = ConfigRecord(
        {
            "protocol": PROTOCOL,
            "client-id": str(update.client_id),
            "partition-id": int(partition_id),
            "layer-names": [str(n) for n in update.layer_names],
            "config-hash": str(config_hash),
            **{f"table-{k}": table[k] for k in TABLE_KEYS},
        }
    )
    if update.scaling is not None:
        if isinstance(update.scaling, Mapping):
            raise InvalidReplyError(
                f"client {update.client_id!r}: the Flower reply carries one LoRA scaling per "
                "client (a number), not one per layer"
            )
        info[SCALING] = float(update.scaling)
    return RecordDict({ARRAYS: to_array_record(tensors), METRICS: metrics, INFO: info})


def statistics_tensors(extras: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The baselines' statistics of ``ClientUpdate.extras`` under their wire names (float64)."""

    def f64(value: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))

    tensors: dict[str, torch.Tensor] = {}
    for stat in EXTRA_FIELDS.values():
        if stat.extra not in extras:
            continue
        value = extras[stat.extra]
        if stat.keyed:
            tensors.update({f"{stat.wire}/{key}": f64(v) for key, v in value.items()})
        else:
            tensors[stat.wire] = f64(value)
    return tensors


def statistics_extras(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`statistics_tensors`: the ``extras`` entries the aggregators read."""
    extras: dict[str, Any] = {}
    for key, value in tensors.items():
        stat = wire_field(key)
        if stat is None:
            continue
        item = value.numpy() if stat.numpy else value
        if stat.keyed:
            extras.setdefault(stat.extra, {})[key.partition("/")[2]] = item
        else:
            extras[stat.extra] = item
    return extras


def unpack_reply(content: RecordDict) -> ClientUpdate:
    """The :class:`ClientUpdate` of a reply built by :func:`pack_reply` (no validation; use
    :func:`validate_reply` on replies from the network). ``origin`` holds the partition id,
    table identity and config hash, ``report`` the training metrics."""
    info = _typed_record(content, INFO, ConfigRecord)
    metrics = _typed_record(content, METRICS, MetricRecord)
    tensors = from_array_record(_typed_record(content, ARRAYS, ArrayRecord))
    lora = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    update = ClientUpdate(
        client_id=str(info["client-id"]),
        num_samples=_int_value(metrics["num-examples"], "metrics key 'num-examples'"),
        lora=lora,
        head_weight=tensors["head/weight"],
        head_bias=tensors.get("head/bias"),
        layer_names=_str_tuple(info.get("layer-names", []), "info key 'layer-names'"),
    )
    if SCALING in info:
        update.scaling = _float_value(info[SCALING], f"info key {SCALING!r}")
    if "omega-a" in metrics:
        update.omega_a = np.asarray(metrics["omega-a"], dtype=np.float64)
        update.omega_b = np.asarray(metrics["omega-b"], dtype=np.float64)
    if "class-sigma" in metrics:
        present = np.asarray(metrics["class-present"], dtype=bool)
        sigma = np.asarray(metrics["class-sigma"], dtype=np.float64)
        update.class_present = present
        update.class_sigma = np.where(present, sigma, np.nan)
        update.class_counts = np.asarray(metrics["class-counts"], dtype=np.int64)
    update.extras = statistics_extras(tensors)
    update.origin = UpdateOrigin(
        partition_id=_int_value(info["partition-id"], "info key 'partition-id'"),
        config_hash=str(info.get("config-hash", "")),
        table={k: info.get(f"table-{k}") for k in TABLE_KEYS},
    )
    update.report = {
        k.replace("-", "_"): v
        for k, v in metrics.items()
        if k.startswith("train-") and isinstance(v, int | float)
    }
    return update


# ------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ReplySpec:
    """What a valid reply holds: array shapes/dtypes, LoRA layers, classes, the statistics the
    method needs, the server's G_SHAP table identity and (optionally) the option hash."""

    arrays: Mapping[str, tuple[tuple[int, ...], str]]
    layer_names: tuple[str, ...]
    num_classes: int
    needs: frozenset[str]
    table: Mapping[str, Any] | None = None
    config_hash: str | None = None
    # the method merges clients of other LoRA ranks than the global model's (client_ranks):
    # LoRA factors of any rank r_m pass with the global d and k and a lora-scaling
    mixed_ranks: bool = False

    @classmethod
    def from_global(
        cls,
        tensors: Mapping[str, torch.Tensor],
        layer_names: tuple[str, ...],
        *,
        needs: frozenset[str],
        table: Mapping[str, Any] | None = None,
        config_hash: str | None = None,
        mixed_ranks: bool = False,
    ) -> ReplySpec:
        """The spec of replies to the global model ``tensors`` (``base/`` keys excluded);
        ``mixed_ranks``: accept LoRA factors of other ranks (the method can merge them)."""
        arrays = {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in tensors.items()
            if not k.startswith("base/")
        }
        arrays.update(statistics_spec(tensors, layer_names, needs))
        return cls(
            arrays=arrays,
            layer_names=tuple(layer_names),
            num_classes=int(tensors["head/weight"].shape[0]),
            needs=frozenset(needs),
            table=dict(table) if table is not None else None,
            config_hash=config_hash,
            mixed_ranks=mixed_ranks,
        )


def statistics_spec(
    tensors: Mapping[str, torch.Tensor], layer_names: tuple[str, ...], needs: frozenset[str]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Wire names, shapes and dtypes of the statistics a method ``needs`` (from the global
    model's LoRA factors ``[r, k]`` and head ``[C, D]``)."""
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    classes, width = (int(n) for n in tensors["head/weight"].shape)
    if "gram" in needs:
        for layer in layer_names:
            k = int(tensors[f"lora/{factor_key(layer, 'A')}"].shape[1])
            spec[f"gram/{layer}"] = ((k, k), "float64")
        spec["head-gram"] = ((width + 1, width + 1), "float64")
    if "fisher" in needs:
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind in ("lora", "head"):
                wire = f"fisher/{name}" if kind == "lora" else f"fisher/head.{name}"
                spec[wire] = (tuple(int(n) for n in value.shape), "float64")
    if "prototypes" in needs:
        spec["proto-mean"] = ((classes, width), "float64")
        spec["proto-count"] = ((classes,), "float64")
    return spec


def _reject(who: str, what: str) -> InvalidReplyError:
    return InvalidReplyError(f"{who}: {what}")


def _number_list(
    who: str, metrics: MetricRecord, key: str, length: int, *, ints: bool = False
) -> np.ndarray:
    if key not in metrics:
        raise _reject(who, f"metrics key {key!r} is missing (the method needs it)")
    value = metrics[key]
    if not isinstance(value, list) or len(value) != length:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise _reject(who, f"metrics key {key!r} holds {got}, expected a list of {length}")
    array = np.asarray(value, dtype=np.int64 if ints else np.float64)
    if not ints and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise _reject(who, f"metrics key {key!r} holds NaN/Inf (first at index {bad})")
    if (array < 0).any():
        bad = int(np.flatnonzero(array < 0)[0])
        raise _reject(who, f"metrics key {key!r} is negative at index {bad}")
    return array


def _required_record(who: str, content: RecordDict, key: str, kind: type[RecordT]) -> RecordT:
    record = get_record(content, key, kind)
    if record is None:
        raise _reject(who, f"record {key!r} ({kind.__name__}) is missing")
    return record


def _check_info(who: str, info: ConfigRecord, spec: ReplySpec) -> None:
    for key in ("protocol", "client-id", "partition-id", "layer-names", "config-hash"):
        if key not in info:
            raise _reject(who, f"info key {key!r} is missing")
    if info["protocol"] != PROTOCOL:
        raise _reject(who, f"info key 'protocol' is {info['protocol']!r}, expected {PROTOCOL}")
    if spec.config_hash is not None and info["config-hash"] != spec.config_hash:
        raise _reject(
            who,
            f"info key 'config-hash' is {str(info['config-hash'])[:12]}..., the server's "
            f"options hash to {spec.config_hash[:12]}... (trained with other options)",
        )
    if spec.table is not None:
        client = {k: info.get(f"table-{k}") for k in TABLE_KEYS}
        if any(client[k] is None for k in TABLE_KEYS):
            missing = [f"table-{k}" for k in TABLE_KEYS if client[k] is None]
            raise _reject(who, f"info keys {missing} (G_SHAP table identity) are missing")
        for key in TABLE_KEYS:
            if client[key] != spec.table[key]:
                raise _reject(
                    who,
                    f"info key 'table-{key}': the client has G_SHAP table {client['name']!s} "
                    f"v{client['version']!s} ({client['checksum']!s}), the server "
                    f"{spec.table['name']} v{spec.table['version']} ({spec.table['checksum']})",
                )


def _check_arrays(who: str, arrays: ArrayRecord, spec: ReplySpec) -> None:
    missing = [k for k in spec.arrays if k not in arrays]
    extra = [k for k in arrays if k not in spec.arrays]
    if missing:
        raise _reject(who, f"array {missing[0]!r} is missing ({len(missing)} missing in all)")
    if extra:
        raise _reject(who, f"unexpected array {extra[0]!r} ({len(extra)} unexpected in all)")
    for key, (shape, dtype) in spec.arrays.items():
        array = arrays[key]
        if spec.mixed_ranks and key.startswith("lora/"):
            _check_lora_shape(who, key, tuple(array.shape), tuple(shape))
        elif tuple(array.shape) != tuple(shape):
            raise _reject(
                who, f"array {key!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        if array.dtype != dtype:
            raise _reject(who, f"array {key!r} has dtype {array.dtype}, expected {dtype}")


def _check_lora_shape(
    who: str, key: str, shape: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    """A LoRA factor of any rank ``r >= 1`` with the global layer size: ``lora_B [d, r]``
    keeps ``d``, ``lora_A [r, k]`` keeps ``k`` (mixed client ranks)."""
    kept = 0 if is_factor_b(key) else 1  # the dimension that is not the rank
    if len(shape) != 2 or shape[kept] != expected[kept] or shape[1 - kept] < 1:
        form = "[d, r]" if kept == 0 else "[r, k]"
        raise _reject(
            who,
            f"array {key!r} has shape {shape}, expected {form} with "
            f"{'d' if kept == 0 else 'k'} = {expected[kept]} (the global model's "
            f"{expected}; the rank may differ)",
        )


def _check_ranks(who: str, arrays: ArrayRecord, info: ConfigRecord, spec: ReplySpec) -> None:
    """Mixed ranks: one rank for A and B of a layer; a rank other than the global model's
    needs the client's ``lora-scaling`` (finite, positive)."""
    ranks: dict[str, int] = {}
    for key, array in arrays.items():
        if key.startswith("lora/"):
            parsed = parse_factor_key(key[len("lora/") :])
            if parsed is None:
                raise _reject(who, f"array {key!r} is no LoRA factor of a layer")
            layer, which, _ = parsed
            rank = int(array.shape[1] if which == "B" else array.shape[0])
            if ranks.setdefault(layer, rank) != rank:
                raise _reject(
                    who,
                    f"layer {layer}: lora_A and lora_B have ranks {sorted({ranks[layer], rank})}"
                    " (one rank r for both)",
                )
    own = set(ranks.values())
    global_ranks = {
        int(shape[0])
        for key, (shape, _) in spec.arrays.items()
        if is_lora_parameter(key) and not is_factor_b(key)
    }
    if own != global_ranks:
        if SCALING not in info:
            raise _reject(
                who,
                f"LoRA rank {sorted(own)} differs from the global model's {sorted(global_ranks)} "
                f"but info key {SCALING!r} (the client's lora_alpha / r) is missing",
            )
        scaling = _float_value(info[SCALING], f"info key {SCALING!r}")
        if not math.isfinite(scaling) or scaling <= 0:
            raise _reject(who, f"info key {SCALING!r} is {scaling!r}, expected a positive number")


def validate_reply(
    content: RecordDict, spec: ReplySpec, *, node_id: int | None = None
) -> ClientUpdate:
    """Check a reply against ``spec`` and return its :class:`ClientUpdate`.

    Raises :class:`InvalidReplyError` naming the node, client and key for: a missing record or
    key, a different protocol, option hash or G_SHAP table (name/version/checksum), arrays of
    the wrong shape or dtype, NaN/Inf in arrays or statistics, negative statistics, statistics
    of the wrong length, layer names that differ from the server's, or no samples. With
    ``spec.mixed_ranks`` LoRA factors of another rank pass when they keep the global ``d`` and
    ``k``, A and B of a layer agree on the rank and the reply carries its ``lora-scaling``.
    """
    node = f"node {node_id}" if node_id is not None else "a node"
    who = f"reply from {node}"
    arrays = _required_record(who, content, ARRAYS, ArrayRecord)
    metrics = _required_record(who, content, METRICS, MetricRecord)
    info = _required_record(who, content, INFO, ConfigRecord)
    if "client-id" in info:
        who = f"reply from {node} (client {info['client-id']!r})"
    _check_info(who, info, spec)
    _check_arrays(who, arrays, spec)
    if spec.mixed_ranks:
        _check_ranks(who, arrays, info, spec)
    num = metrics.get("num-examples")
    if not isinstance(num, int) or num <= 0:
        raise _reject(who, f"metrics key 'num-examples' is {num!r}, expected a positive int")
    layers = len(spec.layer_names)
    if "omega" in spec.needs:
        names = info["layer-names"]
        if not isinstance(names, list) or tuple(names) != tuple(spec.layer_names):
            raise _reject(who, "info key 'layer-names' differs from the server's LoRA layers")
        _number_list(who, metrics, "omega-a", layers)
        _number_list(who, metrics, "omega-b", layers)
    if "sigma" in spec.needs:
        classes = spec.num_classes
        _number_list(who, metrics, "class-sigma", classes)
        present = _number_list(who, metrics, "class-present", classes, ints=True)
        counts = _number_list(who, metrics, "class-counts", classes, ints=True)
        if (present > 1).any():
            raise _reject(who, "metrics key 'class-present' holds values other than 0/1")
        if (present.astype(bool) & (counts < 2)).any():
            raise _reject(who, "metrics key 'class-present' marks a class with < 2 samples")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _reject(who, f"metrics key {key!r} is {value!r}")
    update = unpack_reply(content)
    for key, tensor in (
        *((f"lora/{k}", v) for k, v in update.lora.items()),
        ("head/weight", update.head_weight),
        ("head/bias", update.head_bias),
    ):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise _reject(who, f"array {key!r} holds {count} NaN/Inf values")
    _check_statistics(who, arrays)
    update.origin.node_id = node_id
    return update


def _check_statistics(who: str, arrays: ArrayRecord) -> None:
    """Statistics are finite and non-negative where they must be; a prototype row may be NaN
    only for a class of count 0."""
    for key in arrays:
        stat = wire_field(key)
        if stat is None:
            continue
        value = arrays[key].numpy()
        if stat.nan_rows_where_zero is not None:
            counts = arrays[stat.nan_rows_where_zero].numpy()
            bad = ~np.isfinite(value).all(axis=1) & (counts > 0)
            if bad.any():
                raise _reject(
                    who, f"array {key!r} holds NaN/Inf for class {int(np.flatnonzero(bad)[0])}"
                )
            continue
        if not np.isfinite(value).all():
            raise _reject(who, f"array {key!r} holds {int((~np.isfinite(value)).sum())} NaN/Inf")
        if stat.non_negative and (value < 0).any():
            raise _reject(who, f"array {key!r} holds negative values")


def pack_moments(
    moments: Mapping[str, np.ndarray], *, client_id: str, partition_id: int
) -> RecordDict:
    """CCVR's QUERY reply: class feature moments under the global model it was sent."""
    arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(moments[k], dtype=np.float64)) for k in MOMENT_KEYS}
    )
    info = ConfigRecord(
        {"protocol": PROTOCOL, "client-id": str(client_id), "partition-id": int(partition_id)}
    )
    return RecordDict({MOMENTS: arrays, INFO: info})


def validate_moments(
    content: RecordDict,
    *,
    num_classes: int,
    width: int,
    full_covariance: bool,
    node_id: int | None = None,
) -> tuple[str, dict[str, np.ndarray]]:
    """``(client id, {"mean", "cov", "count"})`` of a CCVR QUERY reply, or
    :class:`InvalidReplyError` naming the node, client and key."""
    who = f"moments reply from node {node_id}" if node_id is not None else "moments reply"
    arrays = _required_record(who, content, MOMENTS, ArrayRecord)
    info = _required_record(who, content, INFO, ConfigRecord)
    if "client-id" not in info:
        raise _reject(who, "info key 'client-id' is missing")
    who = f"{who} (client {info['client-id']!r})"
    if info.get("protocol") != PROTOCOL:
        raise _reject(who, f"info key 'protocol' is {info.get('protocol')!r}, expected {PROTOCOL}")
    cov_shape = (num_classes, width, width) if full_covariance else (num_classes, width)
    expected = {"mean": (num_classes, width), "cov": cov_shape, "count": (num_classes,)}
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        if key not in arrays:
            raise _reject(who, f"array {key!r} is missing")
        value = arrays[key].numpy()
        if tuple(value.shape) != shape:
            raise _reject(who, f"array {key!r} has shape {tuple(value.shape)}, expected {shape}")
        if not np.isfinite(value).all():
            raise _reject(who, f"array {key!r} holds NaN/Inf")
        out[key] = np.asarray(value, dtype=np.float64)
    if (out["count"] < 0).any() or (out["count"] != np.round(out["count"])).any():
        raise _reject(who, "array 'count' holds negative or fractional counts")
    return str(info["client-id"]), out


IDENTIFY = "query.identify"  # message type of the client-sampling identity query


def pack_identity(*, client_id: str, partition_id: int) -> RecordDict:
    """The reply to an identity query: which client (partition) a node trains."""
    info = ConfigRecord(
        {"protocol": PROTOCOL, "client-id": str(client_id), "partition-id": int(partition_id)}
    )
    return RecordDict({INFO: info})


def validate_identity(content: RecordDict, *, node_id: int | None = None) -> str:
    """The client id of an identity reply, or :class:`InvalidReplyError` naming the node."""
    who = f"identity reply from node {node_id}" if node_id is not None else "identity reply"
    info = _required_record(who, content, INFO, ConfigRecord)
    if info.get("protocol") != PROTOCOL:
        raise _reject(who, f"info key 'protocol' is {info.get('protocol')!r}, expected {PROTOCOL}")
    client = info.get("client-id")
    if not isinstance(client, str) or not client:
        raise _reject(who, f"info key 'client-id' is {client!r}, not a client id")
    return client
