"""The LIVAR Flower App: ``server_app`` and ``client_app`` (components in ``pyproject.toml``).

It runs the same computation as ``livar-fed``: the ServerApp builds the initial global model
from the seed, runs the rounds with :class:`~livar_merge.flower.strategy.LivarStrategy`,
evaluates centrally on the test set after each round and writes a results folder like
``livar-fed`` (config.json, provenance.json, metrics.csv/.json, clients.csv, alpha.csv,
head_weights.csv, replies.csv, summary.json, checkpoint/global.safetensors).

Options. The ServerApp reads the run config (``[tool.flwr.app.config]``, ``flwr run
--run-config``): ``preset``, ``config-file`` (TOML/JSON of livar-fed options on the ServerApp's
machine), ``options`` (``"key=value key=value"`` livar-fed options) and any livar-fed option
by its hyphenated name (an empty string means "not set"), in that order of priority, plus
``min-replies`` (0: a majority of ``num-clients``), ``round-timeout`` and
``node-wait-timeout`` (seconds). It sends the resolved options to the clients with every round,
so a ClientApp needs no run config: it builds the data, the Dirichlet split and the seeded
model from them and trains partition ``partition-id`` of its node config (``num-partitions``,
when set, must equal ``num-clients``; ``data-root`` overrides the dataset folder on that node).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from livar_merge.federated.config import FedConfig, load_config_file, resolve_config
from livar_merge.federated.results import aggregation_rows
from livar_merge.flower.messages import (
    ARRAYS,
    CONFIG,
    PROTOCOL,
    PROTOTYPES,
    from_array_record,
    load_global_tensors,
    pack_moments,
    pack_reply,
)

log = logging.getLogger("flwr.livar")  # Flower's handler: shown in `flwr log` too
MEMORY_KEY = "livar-memory"
SERVER_KEYS = (
    "preset",
    "config-file",
    "options",
    "min-replies",
    "round-timeout",
    "node-wait-timeout",
)


@dataclass(frozen=True)
class FlowerSettings:
    """Server-side settings that are not livar-fed options."""

    min_replies: int = 0  # 0: a majority of num_clients
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round
    node_wait_timeout: float = 120.0  # seconds to wait for num_clients nodes before a round

    def resolved_min_replies(self, num_clients: int) -> int:
        return self.min_replies if self.min_replies > 0 else num_clients // 2 + 1


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[FedConfig, FlowerSettings]:
    """livar-fed options and server settings from a Flower run config (see module docstring)."""
    from dataclasses import fields

    names = {f.name for f in fields(FedConfig)}
    unknown = [k for k in run_config if k not in SERVER_KEYS and k.replace("-", "_") not in names]
    if unknown:
        raise ValueError(
            f"run config keys {unknown} are neither livar-fed options nor {SERVER_KEYS}"
        )
    preset = str(run_config.get("preset", "") or "") or None
    path = str(run_config.get("config-file", "") or "")
    file_options = load_config_file(path) if path else {}
    overrides: dict[str, Any] = {}
    for item in shlex.split(str(run_config.get("options", "") or "")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"run config 'options': {item!r} is not key=value")
        overrides[key.strip().replace("-", "_")] = value
    for key, value in run_config.items():
        if key not in SERVER_KEYS and value != "":
            overrides[key.replace("-", "_")] = value
    config = resolve_config(preset, file_options, overrides)
    settings = FlowerSettings(
        min_replies=int(run_config.get("min-replies", 0) or 0),
        round_timeout=float(run_config.get("round-timeout", 3600.0) or 3600.0),
        node_wait_timeout=float(run_config.get("node-wait-timeout", 120.0) or 120.0),
    )
    return config, settings


def default_out(config: FedConfig) -> Path:
    return Path(config.out or Path("runs") / config.run_name())


# ================================================================================ ServerApp
class ServerRun:
    """One Flower run on the server side: global model, strategy, evaluation, results folder."""

    def __init__(self, config: FedConfig, settings: FlowerSettings | None = None) -> None:
        import torch

        from livar_merge.federated.builders import build_seeded_model, load_train_test
        from livar_merge.federated.data import BatchSource
        from livar_merge.federated.paired import paired_from_config
        from livar_merge.federated.runner import resolve_device, resolve_precision
        from livar_merge.flower.messages import frozen_checksum
        from livar_merge.flower.strategy import LivarStrategy

        self.config = replace(config, engine="flower")
        self.settings = settings or FlowerSettings()
        self.out = default_out(config)
        if (self.out / "summary.json").exists() or (self.out / "checkpoint").exists():
            raise FileExistsError(f"{self.out} already holds a run; choose another out folder")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        splits, _, test = load_train_test(config.dataset, config, config.seed)
        self.dataset_source = splits.source
        self.model, self.info = build_seeded_model(config, splits.num_classes, config.seed)
        self.model.to(self.device)
        self.test_source = BatchSource(
            test, mean=self.info.mean, std=self.info.std, device=self.device
        )
        self.test_size = len(test)
        paired = paired_from_config(config)
        self.strategy = LivarStrategy(
            self.model,
            seed=config.seed,
            method=config.method,
            method_options=config.method_options(),
            table=config.table,
            lora_merge=config.lora_merge,
            min_replies=self.settings.resolved_min_replies(config.num_clients),
            min_available_nodes=config.num_clients,
            node_wait_timeout=self.settings.node_wait_timeout,
            config_hash=config.config_hash(),
            frozen_checksum=frozen_checksum(self.model, config.lora_merge),
            query_timeout=self.settings.round_timeout,
            ccvr_round=config.rounds if config.ccvr_rounds == "last" else None,
            paired=paired,
            paired_evaluate=self.evaluate_model,
        )
        self.metrics: list[dict[str, Any]] = []
        self.paired_rows: list[dict[str, Any]] = []

    def _write_static(self) -> None:
        from livar_merge.federated.results import write_run_header

        write_run_header(
            self.out,
            self.config,
            {
                "seed": self.config.seed,
                "aggregator": self.strategy.aggregator.describe(),
                "table": self.strategy.table_identity,
                "model_weights": self.info.weights,
                "weights_provenance": self.info.weights_provenance,
                "dataset_source": self.dataset_source,
                "device": str(self.device),
                "precision": self.precision,
                "engine": "flower",
            },
            flower=self.settings.__dict__,
        )

    def _write_round(self, round_index: int) -> None:
        from livar_merge.federated.results import save_global_checkpoint, write_csv, write_json
        from livar_merge.flower.strategy import reply_outcomes

        clients, alpha, heads = [], [], []
        for entry in self.strategy.history:
            for update in entry.updates:
                clients.append(
                    {
                        "round": entry.round,
                        "client": update.client_id,
                        "node_id": update.extras.get("node_id"),
                        "num_samples": update.num_samples,
                        "train_loss": update.extras.get("train_loss"),
                        "train_accuracy": update.extras.get("train_accuracy"),
                        "steps": update.extras.get("train_steps"),
                        "seconds": update.extras.get("train_seconds"),
                        "statistics_seconds": update.extras.get("train_statistics_seconds"),
                        "upload_bytes": update.extras.get("train_upload_bytes"),
                        "statistics_bytes": update.extras.get("train_statistics_bytes"),
                    }
                )
            rows_a, rows_h = aggregation_rows(entry.round, entry.updates, entry.result)
            alpha += rows_a
            heads += rows_h
        write_csv(self.out / "metrics.csv", self.metrics)
        write_json(self.out / "metrics.json", self.metrics)
        write_csv(self.out / "clients.csv", clients)
        write_csv(self.out / "alpha.csv", alpha)
        write_csv(self.out / "head_weights.csv", heads)
        write_csv(self.out / "replies.csv", reply_outcomes(self.strategy.history))
        if self.paired_rows:
            write_csv(self.out / "paired.csv", self.paired_rows)
        save_global_checkpoint(
            self.out / "checkpoint",
            self.model,
            self.config.lora_merge,
            round_index,
            self.strategy.prototypes,
        )

    def evaluate_model(self, model: Any) -> tuple[float, float]:
        """Test top-1 and loss of ``model`` on the server's test set."""
        import numpy as np

        from livar_merge.federated.client import evaluate

        return evaluate(
            model,
            self.test_source,
            np.arange(self.test_size),
            batch_size=self.config.eval_batch_size,
            precision=self.precision,
        )

    def evaluate(self, round_index: int, arrays: Any) -> MetricRecord | None:
        """Central evaluation after each round (none before round 1, as livar-fed)."""
        from livar_merge.federated.paired import with_differences

        if round_index == 0:
            return None
        self.strategy.sync(arrays)
        accuracy, loss = self.evaluate_model(self.model)
        entry = self.strategy.history[-1]
        self.paired_rows.extend(with_differences(entry.paired, accuracy))
        accepted = sum(o["accepted"] for o in entry.outcomes)
        self.metrics.append(
            {
                "round": round_index,
                "test_accuracy": accuracy,
                "test_loss": loss,
                "train_seconds": entry.train_seconds,
                "aggregation_seconds": entry.aggregation_seconds,
                "moments_seconds": entry.moments_seconds,
                "paired_seconds": sum(
                    r["aggregation_seconds"] + r["evaluation_seconds"] for r in entry.paired
                ),
                "uncovered_classes": len(entry.result.head.uncovered),
                "replies_accepted": accepted,
                "replies_dropped": len(entry.outcomes) - accepted,
            }
        )
        self._write_round(round_index)
        log.info("round %d: test top-1 %.4f, loss %.4f", round_index, accuracy, loss)
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    def run(self, grid: Grid) -> dict[str, Any]:
        """Run all rounds on ``grid`` and write ``summary.json``; returns the summary."""
        from livar_merge.federated.results import run_summary, write_json

        wall = time.perf_counter()
        self._write_static()
        train_config = ConfigRecord(
            {
                "livar-config": json.dumps(self.config.to_dict()),
                "config-hash": self.config.config_hash(),
            }
        )
        self.strategy.start(
            grid,
            initial_arrays=self.strategy.initial_arrays(),
            num_rounds=self.config.rounds,
            timeout=self.settings.round_timeout,
            train_config=train_config,
            evaluate_fn=self.evaluate,
        )
        from livar_merge.federated.paired import paired_summary

        extra: dict[str, Any] = {"engine": "flower"}
        if self.paired_rows:
            extra["paired"] = paired_summary(self.paired_rows, self.config.method)
        summary = run_summary(
            self.config, self.metrics, self.info, time.perf_counter() - wall, **extra
        )
        write_json(self.out / "summary.json", summary)
        return summary


def make_server_app(
    config: FedConfig | None = None, settings: FlowerSettings | None = None
) -> ServerApp:
    """A ServerApp for ``config`` (the Simulation Engine's Python API passes no run config),
    or, with ``config=None``, for the run config of the Context (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            run_config, run_settings = config_from_run_config(context.run_config)
        else:
            run_config, run_settings = config, settings
        ServerRun(run_config, run_settings).run(grid)

    return app


server_app = make_server_app()


# ================================================================================ ClientApp
@dataclass
class ClientRuntime:
    """What a node builds once per configuration: data, split, seeded model."""

    model: Any
    source: Any
    parts: list[Any]
    num_classes: int
    settings: Any
    table: dict[str, Any]
    frozen: str


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
    import numpy as np
    import torch

    from livar_merge.federated.builders import build_seeded_model, load_train_test
    from livar_merge.federated.data import BatchSource
    from livar_merge.federated.partition import dirichlet_partition
    from livar_merge.federated.runner import resolve_device, resolve_precision, settings_from
    from livar_merge.flower.messages import frozen_checksum
    from livar_merge.tables import GShapTable

    key = (config.config_hash(), data_root)
    if key in _RUNTIMES:
        return _RUNTIMES[key]
    _RUNTIMES.clear()
    threads = _thread_count(config)
    if threads:
        torch.set_num_threads(threads)
    local = replace(config, data_root=data_root) if data_root else config
    device = resolve_device(config.device)
    splits, train, _ = load_train_test(config.dataset, local, config.seed)
    parts = dirichlet_partition(
        np.asarray(train.labels),
        config.num_clients,
        config.beta,
        seed=config.seed,
        min_samples=config.min_client_samples,
    )
    model, info = build_seeded_model(config, splits.num_classes, config.seed)
    model.to(device)
    runtime = ClientRuntime(
        model=model,
        source=BatchSource(
            train, mean=info.mean, std=info.std, device=device, num_workers=config.num_workers
        ),
        parts=list(parts),
        num_classes=splits.num_classes,
        settings=settings_from(config, resolve_precision(config.precision, device)),
        table=GShapTable.load(config.table).identity(),
        frozen=frozen_checksum(model, config.lora_merge),
    )
    _RUNTIMES[key] = runtime
    return runtime


def _load_memory(state: RecordDict) -> Any:
    import torch

    from livar_merge.federated.client import ClientMemory

    if MEMORY_KEY not in state:
        return ClientMemory()
    record = state[MEMORY_KEY]
    # As livar-fed: totals kept as a list and restored with torch.tensor (float32).
    return ClientMemory(
        tracker_state={
            "omega": torch.tensor(list(record["omega"])),
            "steps": int(record["steps"]),
            "layer_names": list(record["layer-names"]),
        }
    )


def _save_memory(state: RecordDict, memory: Any) -> None:
    if memory.tracker_state is None:
        return
    tracker = memory.tracker_state
    state[MEMORY_KEY] = ConfigRecord(
        {
            "omega": [float(v) for v in tracker["omega"].tolist()],
            "steps": int(tracker["steps"]),
            "layer-names": [str(n) for n in tracker["layer_names"]],
        }
    )


def _prepare_node(content: RecordDict, context: Context) -> tuple[Any, int, ClientRuntime, Any]:
    """Shared start of a node's work: the run config of the message, the node's partition, its
    (cached) runtime with the global model of the message loaded. Returns
    ``(config, partition, runtime, config record)``."""
    if CONFIG not in content or ARRAYS not in content:
        raise ValueError(f"message lacks the {CONFIG!r} or {ARRAYS!r} record")
    record = content[CONFIG]
    if record.get("protocol") != PROTOCOL:
        raise ValueError(
            f"server speaks LIVAR protocol {record.get('protocol')!r}, this node {PROTOCOL}"
        )
    config = resolve_config(None, None, json.loads(str(record["livar-config"])))
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "node config has no 'partition-id' (start the SuperNode with "
            "--node-config 'partition-id=<m> num-partitions=<M>')"
        )
    partition = int(node["partition-id"])
    if "num-partitions" in node and int(node["num-partitions"]) != config.num_clients:
        raise ValueError(
            f"node config num-partitions={node['num-partitions']} but the run has "
            f"num_clients={config.num_clients}"
        )
    if not 0 <= partition < config.num_clients:
        raise ValueError(f"node config partition-id={partition} not in [0, {config.num_clients})")
    runtime = client_runtime(config, str(node.get("data-root", "") or "") or None)
    expected = record.get("frozen-checksum")
    if expected is not None and expected != runtime.frozen:
        raise ValueError(
            f"frozen backbone differs from the server's ({runtime.frozen[:19]}... vs "
            f"{str(expected)[:19]}...): other weights file, architecture or seed"
        )
    load_global_tensors(runtime.model, from_array_record(content[ARRAYS]))
    return config, partition, runtime, record


def train_on_node(content: RecordDict, context: Context) -> RecordDict:
    """One round on one node: load the global model, train the node's partition, reply."""
    from livar_merge.federated.client import train_client

    config, partition, runtime, record = _prepare_node(content, context)
    prototypes = None
    if PROTOTYPES in content:
        prototypes = from_array_record(content[PROTOTYPES])[PROTOTYPES].to(runtime.source.device)
    memory = _load_memory(context.state)
    update, report = train_client(
        runtime.model,
        runtime.source,
        runtime.parts[partition],
        client_id=f"client_{partition}",
        num_classes=runtime.num_classes,
        settings=runtime.settings,
        seed=config.seed,
        round_index=int(record["server-round"]),
        needs=frozenset(str(n) for n in record.get("needs", [])),
        memory=memory,
        prototypes=prototypes,
    )
    _save_memory(context.state, memory)
    return pack_reply(
        update,
        partition_id=partition,
        table=runtime.table,
        config_hash=config.config_hash(),
        train_metrics={
            "train-loss": float(report.loss),
            "train-accuracy": float(report.accuracy),
            "train-steps": int(report.steps),
            "train-seconds": float(report.seconds),
            "train-statistics-seconds": float(report.statistics_seconds),
            "train-upload-bytes": int(report.upload_bytes),
            "train-statistics-bytes": int(report.statistics_bytes),
        },
    )


client_app = ClientApp()


def moments_on_node(content: RecordDict, context: Context) -> RecordDict:
    """CCVR's query on one node: class feature moments of its partition under the global
    model of the message."""
    from livar_merge.federated.statistics import feature_moments

    _, partition, runtime, record = _prepare_node(content, context)
    moments = feature_moments(
        runtime.model,
        runtime.source,
        runtime.parts[partition],
        runtime.num_classes,
        batch_size=runtime.settings.eval_batch_size,
        full_covariance=record.get("ccvr-covariance", "full") == "full",
    )
    return pack_moments(moments, client_id=f"client_{partition}", partition_id=partition)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point of a training round (errors become error replies)."""
    return Message(train_on_node(msg.content, context), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower entry point of CCVR's moment query (errors become error replies)."""
    return Message(moments_on_node(msg.content, context), reply_to=msg)
