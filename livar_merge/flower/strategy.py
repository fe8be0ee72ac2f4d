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

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from livar_merge.aggregation import ClientUpdate
from livar_merge.aggregation.needs import NEEDS
from livar_merge.aggregation.registry import method_spec
from livar_merge.errors import ConfigError, RoundFailedError
from livar_merge.federated.peft_keys import (
    global_tensors,
    load_global_tensors,
)
from livar_merge.federated.server import FederatedServer, RoundRecord
from livar_merge.flower.base_sync import (
    BaseSync,
    record_bytes,
)
from livar_merge.flower.client_query import FlowerClientQuery
from livar_merge.flower.messages import (
    BROADCAST,
    PROTOCOL,
    ReplySpec,
    from_array_record,
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


class LivarStrategy(Strategy):
    """LIVAR as a Flower strategy.

    Args:
        server: the :class:`~livar_merge.federated.server.FederatedServer` that owns the
            global model and the round (method, options, table, LoRA merge, CCVR round,
            paired methods: ``FederatedServer(model, seed=0, method="livar")``, or
            ``FederatedServer.from_config(model, config)``); its model's LoRA layers and head
            were checked when it was built, and its method is checked here against what the
            wire format carries.
        settings: :class:`FlowerSettings`: ``min_replies`` (a round fails with
            :class:`RoundFailedError` below it; 0: a majority of the nodes a round sends to:
            ``min_available_nodes``, or with client sampling the server's
            ``clients_per_round``; at least 1; it may not exceed ``clients_per_round``),
            ``node_wait_timeout``, and ``round_timeout`` (also the wait for client queries'
            and the identity replies).
        min_available_nodes: wait up to ``node_wait_timeout`` s for this many nodes before a
            round; after that the round goes on with those connected (at least min_replies).
        config_hash: if given, replies trained with other options are dropped.
        frozen_checksum: sent to clients, which refuse to train on another backbone.
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
        self.min_replies = settings.resolved_min_replies(sampled or min_available_nodes)
        self.nodes = NodeDirectory(
            min_available_nodes=min_available_nodes,
            min_replies=self.min_replies,
            wait_timeout=settings.node_wait_timeout,
            participants=server.participants if sampled is not None else None,
        )
        self.config_hash = config_hash
        self.frozen_checksum = frozen_checksum
        self.query_timeout = settings.round_timeout
        self.history: list[RoundRecord] = []
        self._current: ArrayRecord | None = None
        self.base = BaseSync(server)  # product mode's frozen-weight versions
        self._download_bytes: dict[int, int] = {}  # node -> payload bytes of its last message
        self._messages: list[Message] = []
        self._sent_at = 0.0
        self._spec: ReplySpec | None = None
        self._grid: Grid | None = None
        self._train_config: ConfigRecord | None = None
        self._participants: list[str] | None = None  # the round's sampled clients

    # ------------------------------------------------------------------------- helpers
    @property
    def method(self) -> str:
        return self.server.method

    @property
    def model(self) -> torch.nn.Module:
        return self.server.model

    @property
    def aggregator(self) -> Any:
        return self.server.aggregator

    @property
    def needs(self) -> frozenset[str]:
        return self.server.needs

    def global_arrays(self) -> ArrayRecord:
        """The server's global model as an ArrayRecord."""
        return to_array_record(global_tensors(self.model, self.server.lora_merge))

    def initial_arrays(self) -> ArrayRecord:
        """The global model to pass to ``start(initial_arrays=...)``."""
        self._current = self.global_arrays()
        return self._current

    def reply_spec(self) -> ReplySpec:
        """What a valid reply holds (shapes are fixed for a run, so computed once)."""
        if self._spec is None:
            self._spec = ReplySpec.from_global(
                global_tensors(self.model, self.server.lora_merge),
                self.server.layer_names,
                needs=self.needs,
                table=self.table_identity,
                config_hash=self.config_hash,
                mixed_ranks=self.server.accepts_mixed_ranks,
            )
        return self._spec

    def head_shape(self) -> tuple[int, int]:
        """``(classes, width)`` of the global head."""
        classes, width = self.reply_spec().arrays["head/weight"][0]
        return classes, width

    def sync(self, arrays: ArrayRecord) -> None:
        """Make the server's model hold ``arrays`` (a no-op for the record it produced)."""
        if arrays is not self._current:
            load_global_tensors(self.model, from_array_record(arrays))
            self._current = arrays
            self.base.reset()  # another model: no node holds its frozen weights

    def summary(self) -> None:
        log.info(
            "LivarStrategy: method %s, table %s v%s, lora_merge %s, min_replies %d",
            self.method,
            self.table_identity["name"],
            self.table_identity["version"],
            self.server.lora_merge,
            self.min_replies,
        )

    # ---------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and the round's ConfigRecord to every connected node, or with
        client sampling to the nodes of the round's sampled clients."""
        self.sync(arrays)
        nodes, self._participants = self.nodes.round_nodes(server_round, grid, config)
        config["server-round"] = server_round
        config["protocol"] = PROTOCOL
        config["needs"] = sorted(self.needs)
        config["lora-merge"] = self.server.lora_merge
        for key, value in self.table_identity.items():
            config[f"table-{key}"] = value
        if self.frozen_checksum is not None:
            config["frozen-checksum"] = self.frozen_checksum
        extra = {}
        broadcast = self.server.broadcast()
        if broadcast:
            extra[BROADCAST] = to_array_record(broadcast)
        self._grid, self._train_config = grid, config
        messages = [
            Message(
                content=content,
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node, content in self.model_contents(nodes, config, extra).items()
        ]
        self._messages = messages
        self._sent_at = time.perf_counter()
        log.info("round %d: sent the global model to %d nodes", server_round, len(nodes))
        return messages

    # ------------------------------------------------------------------- model download
    def model_contents(
        self, nodes: Sequence[int], config: ConfigRecord, extra: Mapping[str, Any] | None = None
    ) -> dict[int, RecordDict]:
        """The content of each node's message: the global model and ``config`` (plus
        ``extra`` records); in ``product`` mode lighter for nodes holding an earlier version
        of the frozen weights (:class:`livar_merge.flower.base_sync.BaseSync`)."""
        arrays = self._current if self._current is not None else self.initial_arrays()
        return self._with_bytes(self.base.contents(list(nodes), arrays, config, dict(extra or {})))

    def installed_contents(
        self, nodes: Sequence[int], config: ConfigRecord
    ) -> dict[int, RecordDict]:
        """:meth:`model_contents` of the model the server just installed (client queries)."""
        self._current = self.global_arrays()
        return self.model_contents(nodes, config)

    def _with_bytes(self, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """Record each node's payload bytes (counted once per distinct message)."""
        sizes: dict[int, int] = {}
        for node, content in contents.items():
            if id(content) not in sizes:
                sizes[id(content)] = record_bytes(content)
            self._download_bytes[node] = sizes[id(content)]
        return contents

    def _drop(self, outcomes: list[dict[str, Any]], reason: str, **row: Any) -> None:
        log.warning("dropped %s", reason)
        outcomes.append({**row, "accepted": False, "reason": reason})

    def accepted_updates(
        self, server_round: int, replies: list[Message], outcomes: list[dict[str, Any]]
    ) -> list[ClientUpdate]:
        """The valid replies' updates, one per client id (lowest node id), in client-id order;
        every reply or silent node gets an outcome row."""
        messages, self._messages = self._messages, []
        spec = self.reply_spec()

        def validate(content: RecordDict, node: int) -> tuple[str, ClientUpdate]:
            update = validate_reply(content, spec, node_id=node)
            return update.client_id, update

        screen = screen_replies(messages, replies, validate, inspect=self.base.confirm)

        def row(node: int, client: str | None) -> dict[str, Any]:
            return {
                "round": server_round,
                "node_id": node,
                "client": client,
                "download_bytes": self._download_bytes.get(node),
            }

        for node in screen.lost:  # its frozen weights are unknown now
            self.base.forget(node)
        for drop in [*screen.dropped, *screen.duplicates]:
            self._drop(outcomes, drop.reason, **row(drop.node, drop.client))
        for node in screen.silent:
            reason = f"node {node}: no reply within the round timeout"
            self._drop(outcomes, reason, **row(node, None))
        updates = []
        for valid in screen.valid:
            self.nodes.learn(valid.node, valid.client)
        for valid in screen.accepted:
            valid.value.origin.download_bytes = self._download_bytes.get(valid.node)
            updates.append(valid.value)
            outcomes.append({**row(valid.node, valid.client), "accepted": True, "reason": ""})
        return updates

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, drop, sort by client id, aggregate, install; returns the new global."""
        train_seconds = time.perf_counter() - self._sent_at if self._sent_at else 0.0
        replies = list(replies)
        outcomes: list[dict[str, Any]] = []
        updates = self.accepted_updates(server_round, replies, outcomes)
        if len(updates) < self.min_replies:
            reasons = "; ".join(o["reason"] for o in outcomes if not o["accepted"])
            raise RoundFailedError(
                f"round {server_round}: {len(updates)} valid replies of {len(replies)} "
                f"received, min_replies is {self.min_replies}. Dropped: {reasons or 'none'}"
            )

        clients = None
        if self._grid is not None:  # the Grid of configure_train carries client queries
            clients = FlowerClientQuery(
                self._grid,
                server_round,
                self._train_config or ConfigRecord(),
                self.installed_contents,
                self.base,
                self.head_shape(),
                self.min_replies,
                self.query_timeout,
                outcomes,
            )
        record = self.server.aggregate_round(
            server_round,
            updates,
            train_seconds=train_seconds,
            clients=clients,
            outcomes=outcomes,
            participants=self._participants,
        )
        outcomes.sort(key=lambda o: (not o["accepted"], str(o["client"]), o["node_id"]))
        self._current = self.global_arrays()
        self.history.append(record)
        return self._current, _train_metrics(updates, len(outcomes) - len(updates))

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
