"""The LIVAR Flower ClientApp (``client_app``; component in ``pyproject.toml``).

A ClientApp needs no run config: every message carries the resolved livar-fed options, from
which the node builds (once per configuration) the same federation as the server and
``livar-fed`` (:func:`~livar_merge.federated.federation.build_federation`) and trains partition
``partition-id`` of its node config (``num-partitions``, when set, must equal ``num-clients``;
``data-root`` overrides the dataset folder on that node). The client memory (cumulative omega
totals) lives in the node's ``context.state`` with the codec of
:class:`~livar_merge.federated.client.ClientMemory`. With ``client_ranks`` the node trains at
its client's rank (:meth:`~livar_merge.federated.config.FedConfig.client_rank`, from the run's
options alone) a model of that rank started from the global model
(:class:`~livar_merge.federated.ranks.RankModels`) and replies its ``lora-scaling``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from livar_merge.errors import NodeConfigError
from livar_merge.federated.client import ClientMemory, train_client
from livar_merge.federated.config import FedConfig, resolve_config
from livar_merge.federated.federation import Federation, build_federation, client_id
from livar_merge.federated.global_state import load_global_tensors
from livar_merge.federated.model import restore_parameters
from livar_merge.federated.ranks import RankModels
from livar_merge.flower.base_sync import BaseResync, resync_reply, sync_node_base
from livar_merge.flower.messages import (
    ARRAYS,
    BROADCAST,
    CONFIG,
    INFO,
    PROTOCOL,
    from_array_record,
    get_record,
    pack_identity,
    pack_moments,
    pack_reply,
)
from livar_merge.lora_view import frozen_checksum
from livar_merge.tables import GShapTable

MEMORY_KEY = "livar-memory"


@dataclass
class ClientRuntime:
    """What a node builds once per configuration: the federation, table identity, checksum."""

    federation: Federation
    table: dict[str, object]
    frozen: str
    rank_models: RankModels  # the node's model when its client_ranks rank is not lora_rank


_RUNTIMES: dict[tuple[str, str | None], ClientRuntime] = {}


def _thread_count(config: FedConfig) -> int | None:
    """``threads`` capped by ``OMP_NUM_THREADS`` (Ray sets it to a ClientApp's CPU share)."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    limit = int(cap) if cap.isdigit() and int(cap) > 0 else None
    if config.threads and limit:
        return min(config.threads, limit)
    return config.threads or limit


def client_runtime(config: FedConfig, data_root: str | None = None) -> ClientRuntime:
    """The (cached) runtime of ``config``; ``data_root`` overrides the dataset folder."""
    key = (config.config_hash(), data_root)
    if key in _RUNTIMES:
        return _RUNTIMES[key]
    _RUNTIMES.clear()
    federation = build_federation(
        config,
        dataset=config.dataset,
        seed=config.seed,
        beta=config.beta,
        data_root=data_root,
        threads=_thread_count(config),
    )
    runtime = ClientRuntime(
        federation=federation,
        table=GShapTable.load(config.table).identity(),
        frozen=frozen_checksum(federation.model, config.lora_merge),
        rank_models=RankModels(config, federation.num_classes, federation.device),
    )
    _RUNTIMES[key] = runtime
    return runtime


def _load_memory(state: RecordDict) -> ClientMemory:
    return ClientMemory.from_record(dict(state[MEMORY_KEY]) if MEMORY_KEY in state else None)


def _save_memory(state: RecordDict, memory: ClientMemory) -> None:
    record = memory.to_record()
    if record is not None:
        state[MEMORY_KEY] = ConfigRecord(record)


def node_partition(context: Context, num_clients: int | None = None) -> int:
    """The partition of the node's config (``partition-id``), checked against
    ``num-partitions`` and, when given, the run's ``num_clients``."""
    node = context.node_config
    if "partition-id" not in node:
        raise NodeConfigError(
            "node config has no 'partition-id' (start the SuperNode with "
            "--node-config 'partition-id=<m> num-partitions=<M>')"
        )
    partition = int(node["partition-id"])
    if num_clients is not None:
        if "num-partitions" in node and int(node["num-partitions"]) != num_clients:
            raise NodeConfigError(
                f"node config num-partitions={node['num-partitions']} but the run has "
                f"num_clients={num_clients}"
            )
        if not 0 <= partition < num_clients:
            raise NodeConfigError(f"node config partition-id={partition} not in [0, {num_clients})")
    return partition


def _prepare_node(
    content: RecordDict, context: Context
) -> tuple[FedConfig, int, ClientRuntime, ConfigRecord, dict[str, int | str]]:
    """Shared start of a node's work: the run config of the message, the node's partition, its
    (cached) runtime with the global model of the message loaded (in ``product`` mode the
    frozen weights from the message or from those the node kept plus the round updates,
    :func:`~livar_merge.flower.base_sync.sync_node_base`). Returns ``(config, partition,
    runtime, config record, the info a reply confirms about the frozen weights)``."""
    record = get_record(content, CONFIG, ConfigRecord)
    arrays = get_record(content, ARRAYS, ArrayRecord)
    if record is None or arrays is None:
        raise NodeConfigError(f"message lacks the {CONFIG!r} or {ARRAYS!r} record")
    if record.get("protocol") != PROTOCOL:
        raise NodeConfigError(
            f"server speaks LIVAR protocol {record.get('protocol')!r}, this node {PROTOCOL}"
        )
    config = resolve_config(None, None, json.loads(str(record["livar-config"])))
    partition = node_partition(context, config.num_clients)
    data_root = str(context.node_config.get("data-root", "") or "") or None
    runtime = client_runtime(config, data_root)
    expected = record.get("frozen-checksum")
    if expected is not None and expected != runtime.frozen:
        raise NodeConfigError(
            f"frozen backbone differs from the server's ({runtime.frozen[:19]}... vs "
            f"{str(expected)[:19]}...): other weights file, architecture or seed"
        )
    load_global_tensors(runtime.federation.model, from_array_record(arrays))
    base_info = None
    if config.lora_merge == "product":
        base_info = sync_node_base(runtime.federation.model, content, record, context.state)
    return config, partition, runtime, record, base_info or {}


def _config_int(record: ConfigRecord, key: str) -> int:
    value = record[key]
    if not isinstance(value, int | float | str | bytes):
        raise NodeConfigError(f"message config {key!r} is a {type(value).__name__}, not a number")
    return int(value)


def _config_names(record: ConfigRecord, key: str) -> frozenset[str]:
    """The strings of a list entry of ``record`` (absent: none)."""
    value = record.get(key, [])
    if not isinstance(value, list):
        raise NodeConfigError(f"message config {key!r} is a {type(value).__name__}, not a list")
    return frozenset(str(n) for n in value)


def train_on_node(content: RecordDict, context: Context) -> RecordDict:
    """One round on one node: load the global model, train the node's partition, reply."""
    config, partition, runtime, record, base_info = _prepare_node(content, context)
    fed = runtime.federation
    broadcast = {}
    if BROADCAST in content:  # what the method sent with the round (Aggregator.broadcast)
        arrays = get_record(content, BROADCAST, ArrayRecord)
        if arrays is None:
            raise NodeConfigError(f"message record {BROADCAST!r} is not an ArrayRecord")
        broadcast = {k: v.to(fed.device) for k, v in from_array_record(arrays).items()}
    memory = _load_memory(context.state)
    round_index = _config_int(record, "server-round")
    model, rank = fed.model, config.client_rank(partition)  # the client_ranks rule
    if rank != config.lora_rank:  # a model of its rank, started from the global one
        model, start = runtime.rank_models.start(rank, fed.model, round_index, fresh=True)
        restore_parameters(model, start)
    update, report = train_client(
        model,
        fed.train_source,
        fed.parts[partition],
        client_id=client_id(partition),
        num_classes=fed.num_classes,
        settings=fed.settings,
        seed=config.seed,
        round_index=round_index,
        needs=_config_names(record, "needs"),
        memory=memory,
        broadcast=broadcast,
        pretrained_base=fed.pretrained_base,
    )
    _save_memory(context.state, memory)
    update.report = report.metrics()
    if config.mixed_ranks():  # the server folds the client's scaling into its factors
        update.scaling = runtime.rank_models.scaling(rank)
    reply = pack_reply(
        update, partition_id=partition, table=runtime.table, config_hash=config.config_hash()
    )
    _confirm(reply, base_info)
    return reply


def _confirm(reply: RecordDict, base_info: dict[str, int | str]) -> None:
    """Add the frozen-weight version the node now holds to the reply's info."""
    info = get_record(reply, INFO, ConfigRecord)
    if info is not None:
        for key, value in base_info.items():
            info[key] = value


def moments_on_node(content: RecordDict, context: Context) -> RecordDict:
    """CCVR's query on one node: class feature moments of its partition under the global
    model of the message."""
    _, partition, runtime, record, base_info = _prepare_node(content, context)
    moments = runtime.federation.client_moments(
        runtime.federation.model,
        partition,
        full_covariance=record.get("ccvr-covariance", "full") == "full",
    )
    reply = pack_moments(moments, client_id=client_id(partition), partition_id=partition)
    _confirm(reply, base_info)
    return reply


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point of a training round (errors become error replies; a node that
    cannot reach the message's frozen weights asks for them in full instead of training)."""
    try:
        return Message(train_on_node(msg.content, context), reply_to=msg)
    except BaseResync as error:
        return Message(resync_reply(error), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower entry point of CCVR's moment query (errors become error replies; a full-weights
    request as in :func:`train`)."""
    try:
        return Message(moments_on_node(msg.content, context), reply_to=msg)
    except BaseResync as error:
        return Message(resync_reply(error), reply_to=msg)


@client_app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Flower entry point of client sampling's identity query: the node's client id (no
    model is built)."""
    record = get_record(msg.content, CONFIG, ConfigRecord)
    num_clients: int | None = None
    if record is not None and "livar-config" in record:  # the run's options, as with training
        run = resolve_config(None, None, json.loads(str(record["livar-config"])))
        num_clients = run.num_clients
    partition = node_partition(context, num_clients)
    return Message(
        pack_identity(client_id=client_id(partition), partition_id=partition), reply_to=msg
    )
