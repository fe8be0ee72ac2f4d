"""``LivarStrategy``: LIVAR (and its baselines) as a Flower 1.41 message-based strategy.

Each round the strategy broadcasts the global model to every connected node, checks each reply
with :func:`~livar_merge.flower.messages.validate_reply`, drops bad ones with a logged reason,
reduces the rest in client-id order and hands them to the flwr-free
:class:`~livar_merge.federated.server.FederatedServer`, which aggregates, installs, runs CCVR and
the paired evaluations exactly as ``livar-fed``'s in-process engine does; the strategy keeps
only the transport (messages, reply validation, node waiting; client queries in
:mod:`livar_merge.flower.client_query`). Every method of the registry runs: the baselines'
statistics travel in the replies; what a method broadcasts (FedProto's global prototypes) goes
out with the next train message; a method's ``after_install`` query (CCVR's class feature
moments under the new global model) is a QUERY round trip. Client-side evaluation is not used:
the ServerApp evaluates centrally through ``Strategy.start(evaluate_fn=...)``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from livar_merge.aggregation import ClientUpdate
from livar_merge.aggregation.needs import NEEDS
from livar_merge.aggregation.registry import method_spec
from livar_merge.errors import ConfigError, RoundFailedError
from livar_merge.federated.global_state import global_tensors
from livar_merge.federated.server import FederatedServer, RoundRecord
from livar_merge.flower.client_query import FlowerClientQuery
from livar_merge.flower.download import GlobalDownload
from livar_merge.flower.messages import (
    BROADCAST,
    PROTOCOL,
    ReplySpec,
    to_array_record,
    validate_reply,
)
from livar_merge.flower.nodes import NodeDirectory
from livar_merge.flower.screening import screen_replies

log = logging.getLogger("flwr.livar")  # Flower's handler: shown in `flwr log` too


def check_method(method: str, needs: Iterable[str] | None = None) -> None:
    """Raise if ``method`` needs client statistics the wire format does not carry (it
    carries every need of :data:`livar_merge.aggregation.needs.NEEDS`)."""
    if needs is None:
        needs = method_spec(method).needs
    unsupported = set(needs) - NEEDS.keys()
    if unsupported:
        raise ConfigError(
            f"method {method!r} needs {sorted(unsupported)}, which the Flower wire format "
            f"does not carry; it carries {sorted(NEEDS)}"
        )


@dataclass(frozen=True)
class FlowerSettings:
    """Server-side settings of a Flower run that are not livar-fed options (one home of their
    defaults: the ServerApp's run config and :class:`LivarStrategy` read them from here)."""

    min_replies: int = 0  # 0: a majority of the nodes a round expects (sampled or all)
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round (and moments)
    node_wait_timeout: float = 120.0  # seconds to wait for the expected nodes before a round

    def __post_init__(self) -> None:
        if self.min_replies < 0:
            raise ConfigError(f"min_replies must be >= 0, got {self.min_replies}")
        for name in ("round_timeout", "node_wait_timeout"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    def resolved_min_replies(self, expected_nodes: int) -> int:
        """``min_replies``, or (0) a majority of ``expected_nodes``; at least 1."""
        return self.min_replies if self.min_replies > 0 else max(1, expected_nodes // 2 + 1)


DEFAULTS = FlowerSettings()


@dataclass(frozen=True)
class RoundInFlight:
    """What a train round sent, kept until its replies come back: the Grid, the round's train
    config, what the method broadcast with it, the messages (to name silent nodes), the sampled
    clients and when it was sent."""

    server_round: int
    grid: Grid
    config: ConfigRecord
    extra: dict[str, ArrayRecord]
    messages: list[Message]
    participants: list[str] | None
    sent_at: float

    def remaining(self, timeout: float) -> float:
        """Seconds left of ``timeout`` since the round was sent (at least 1)."""
        return max(1.0, timeout - (time.perf_counter() - self.sent_at))


@dataclass
class RoundLog:
    """The strategy's rounds: the train round in flight (sent, its replies pending) and the
    records of the finished ones (what the ServerApp writes). Only the last record keeps its
    client updates (every client's LoRA, head and statistics): an earlier one's ``updates``
    are emptied when the next is added, so the server's memory does not grow with the rounds."""

    in_flight: RoundInFlight | None = None
    history: list[RoundRecord] = field(default_factory=list)
    completed_before: int = 0  # rounds a resumed run had finished before Flower's round 1

    def run_round(self, flower_round: int) -> int:
        """The run's round of Flower's ``flower_round`` (Flower counts from 1 in each
        ``start``; a resumed run continues after its checkpoint's round)."""
        return self.completed_before + flower_round

    def add(self, record: RoundRecord) -> None:
        """Append ``record``; release the client updates of the one before."""
        if self.history:
            self.history[-1].updates = []
        self.history.append(record)


class LivarStrategy(Strategy):
    """LIVAR as a Flower strategy.

    Args:
        server: the :class:`~livar_merge.federated.server.FederatedServer` that owns the
            global model and the round (method, options, table, LoRA merge, paired methods:
            ``FederatedServer(model, seed=0, method="livar")``, or
            ``FederatedServer.from_config(model, config)``); its model's LoRA layers and head
            were checked when it was built, and its method is checked here against what the
            wire format carries.
        settings: :class:`FlowerSettings`: ``min_replies`` (a round fails with
            :class:`RoundFailedError` below it; 0: a majority of the nodes a round sends to:
            ``min_available_nodes``, or with client sampling the server's
            ``clients_per_round``; at least 1; it may not exceed ``clients_per_round``),
            ``node_wait_timeout``, and ``round_timeout`` (also the wait for client queries
            and the identity replies).
        min_available_nodes: wait up to ``node_wait_timeout`` s for this many nodes before a
            round; after that the round goes on with those connected (at least min_replies).
        config_hash: if given, replies trained with other options are dropped.
        frozen_checksum: sent to clients, which refuse to train on another backbone.

    It delegates the model download to :class:`~livar_merge.flower.download.GlobalDownload`,
    the nodes of a round to :class:`~livar_merge.flower.nodes.NodeDirectory`, reply screening
    to :func:`~livar_merge.flower.screening.screen_replies` and client queries to
    :class:`~livar_merge.flower.client_query.FlowerClientQuery`.
    """

    def __init__(
        self,
        server: FederatedServer,
        *,
        settings: FlowerSettings = DEFAULTS,
        min_available_nodes: int = 0,
        config_hash: str | None = None,
        frozen_checksum: str | None = None,
    ) -> None:
        check_method(server.method, server.needs)
        self.server = server
        self.table_identity = self.server.table_identity  # loads the table: fails here
        sampled = server.clients_per_round
        if sampled is not None and settings.min_replies > sampled:
            raise ConfigError(
                f"min_replies {settings.min_replies} exceeds clients_per_round {sampled}: "
                "a round sends to only that many nodes"
            )
        self.settings = settings
        self.min_replies = settings.resolved_min_replies(sampled or min_available_nodes)
        self.nodes = NodeDirectory(
            min_available_nodes=min_available_nodes,
            min_replies=self.min_replies,
            wait_timeout=settings.node_wait_timeout,
            participants=server.participants if sampled is not None else None,
        )
        self.config_hash = config_hash
        self.frozen_checksum = frozen_checksum
        self.download = GlobalDownload(server)
        self.rounds = RoundLog()

    @property
    def history(self) -> list[RoundRecord]:
        """The records of the finished rounds."""
        return self.rounds.history

    def initial_arrays(self) -> ArrayRecord:
        """The global model to pass to ``start(initial_arrays=...)``."""
        return self.download.refresh()

    def sync(self, arrays: ArrayRecord) -> None:
        """Make the server's model hold ``arrays`` (a no-op for the record it produced)."""
        self.download.sync(arrays)

    @functools.cached_property
    def reply_spec(self) -> ReplySpec:
        """What a valid reply holds (shapes are fixed for a run)."""
        return ReplySpec.from_global(
            global_tensors(self.server.model, self.server.lora_merge),
            self.server.layer_names,
            needs=self.server.needs,
            table=self.table_identity,
            config_hash=self.config_hash,
            mixed_ranks=self.server.accepts_mixed_ranks,
        )

    def summary(self) -> None:
        log.info(
            "LivarStrategy: method %s, table %s v%s, lora_merge %s, min_replies %d",
            self.server.method,
            self.table_identity["name"],
            self.table_identity["version"],
            self.server.lora_merge,
            self.min_replies,
        )

    # ---------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model, the round's ConfigRecord and what the method broadcasts to
        every connected node, or with client sampling to the nodes of the sampled clients."""
        server_round = self.rounds.run_round(server_round)
        self.sync(arrays)
        nodes, participants = self.nodes.round_nodes(server_round, grid, config)
        config["server-round"] = server_round
        config["protocol"] = PROTOCOL
        config["needs"] = sorted(self.server.needs)
        config["lora-merge"] = self.server.lora_merge
        for key, value in self.table_identity.items():
            config[f"table-{key}"] = value
        if self.frozen_checksum is not None:
            config["frozen-checksum"] = self.frozen_checksum
        broadcast = self.server.broadcast()
        extra = {BROADCAST: to_array_record(broadcast)} if broadcast else {}
        messages = [
            Message(
                content=content,
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node, content in self.download.contents(nodes, config, extra).items()
        ]
        self.rounds.in_flight = RoundInFlight(
            server_round, grid, config, extra, messages, participants, time.perf_counter()
        )
        log.info("round %d: sent the global model to %d nodes", server_round, len(nodes))
        return messages

    def accepted_updates(
        self,
        server_round: int,
        sent: list[Message],
        replies: list[Message],
        resynced: Mapping[int, str] | None = None,
    ) -> tuple[list[ClientUpdate], list[dict[str, Any]]]:
        """The valid replies to the ``sent`` messages, one per client id (lowest node id), in
        client-id order, and an outcome row for every reply or silent node (``base_resync``:
        why a node was sent the full frozen weights again within the round, ``resynced``)."""
        outcomes: list[dict[str, Any]] = []
        node_bytes = self.download.node_bytes
        resynced = resynced or {}

        def validate(content: RecordDict, node: int) -> tuple[str, ClientUpdate]:
            update = validate_reply(content, self.reply_spec, node_id=node)
            return update.client_id, update

        screen = screen_replies(sent, replies, validate, inspect=self.download.base.confirm)

        def row(node: int, client: str | None, reason: str = "") -> dict[str, Any]:
            if reason:
                log.warning("dropped %s", reason)
            info = {"round": server_round, "node_id": node, "client": client}
            info |= {"download_bytes": node_bytes.get(node), "base_resync": resynced.get(node, "")}
            return {**info, "accepted": not reason}

        for node in screen.lost:  # its frozen weights are unknown now
            self.download.base.forget(node)
        for drop in [*screen.dropped, *screen.duplicates]:
            outcomes.append({**row(drop.node, drop.client, drop.reason), "reason": drop.reason})
        for node in screen.silent:
            reason = f"node {node}: no reply within the round timeout"
            outcomes.append({**row(node, None, reason), "reason": reason})
        for valid in screen.valid:
            self.nodes.learn(valid.node, valid.client)
        for valid in screen.accepted:
            valid.value.origin.download_bytes = node_bytes.get(valid.node)
            outcomes.append({**row(valid.node, valid.client), "reason": ""})
        return [valid.value for valid in screen.accepted], outcomes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, drop, sort by client id, aggregate, install; returns the new global."""
        server_round = self.rounds.run_round(server_round)
        flight, self.rounds.in_flight = self.rounds.in_flight, None
        replies = list(replies)
        sent = flight.messages if flight is not None else []
        resynced: dict[int, str] = {}
        if flight is not None:  # nodes that could not fold the frozen weights get them in full
            sent, replies, resynced = self.download.recover(
                flight.grid,
                sent,
                replies,
                lambda nodes: self.download.contents(nodes, flight.config, flight.extra),
                flight.remaining(self.settings.round_timeout),
            )
        train_seconds = time.perf_counter() - flight.sent_at if flight is not None else 0.0
        updates, outcomes = self.accepted_updates(server_round, sent, replies, resynced)
        if len(updates) < self.min_replies:
            reasons = "; ".join(o["reason"] for o in outcomes if not o["accepted"])
            raise RoundFailedError(
                f"round {server_round}: {len(updates)} valid replies of {len(replies)} "
                f"received, min_replies is {self.min_replies}. Dropped: {reasons or 'none'}"
            )
        record = self.server.aggregate_round(
            server_round,
            updates,
            train_seconds=train_seconds,
            clients=self.client_query(flight, outcomes),
            outcomes=outcomes,
            participants=flight.participants if flight is not None else None,
        )
        outcomes.sort(key=lambda o: (not o["accepted"], str(o["client"]), o["node_id"]))
        self.rounds.add(record)
        return self.download.refresh(), _train_metrics(updates, len(outcomes) - len(updates))

    def client_query(
        self, flight: RoundInFlight | None, outcomes: list[dict[str, Any]]
    ) -> FlowerClientQuery | None:
        """The round's :class:`FlowerClientQuery` (None without the Grid of configure_train)."""
        if flight is None:
            return None
        classes, width = self.reply_spec.arrays["head/weight"][0]
        return FlowerClientQuery(
            flight.grid,
            flight.server_round,
            flight.config,
            self.download,
            (classes, width),
            self.min_replies,
            self.settings.round_timeout,
            outcomes,
        )

    # ------------------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation (the ServerApp evaluates centrally)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


def _train_metrics(updates: list[ClientUpdate], dropped: int) -> MetricRecord:
    """Sample-weighted training loss/accuracy of the accepted replies and reply counts."""
    total = sum(u.num_samples for u in updates)
    metrics = MetricRecord(
        {"replies-accepted": len(updates), "replies-dropped": dropped, "num-examples": total}
    )
    for key in ("train_loss", "train_accuracy"):
        values: list[tuple[Any, int]] = [
            (u.report[key], u.num_samples) for u in updates if key in u.report
        ]
        if values and total > 0:
            metrics[key.replace("_", "-")] = float(sum(v * n for v, n in values) / total)
    return metrics


def reply_outcomes(history: Iterable[RoundRecord]) -> list[Mapping[str, Any]]:
    """All reply outcomes of a run (for ``replies.csv``)."""
    return [o for entry in history for o in entry.outcomes or []]
