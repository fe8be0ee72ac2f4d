"""Which nodes a round reaches: waiting for nodes to connect, the node -> client id map learnt
from identity queries and replies, and client sampling over the connected nodes' clients by the
rule of ``livar-fed`` (:meth:`livar_merge.federated.server.FederatedServer.participants`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from livar_merge.errors import RoundFailedError
from livar_merge.flower.messages import CONFIG, IDENTIFY, validate_identity
from livar_merge.flower.screening import screen_replies

log = logging.getLogger("flwr.livar")

# (round, {client id: node}) -> the round's participants, in client-id order
Participants = Callable[[int, Mapping[str, int]], list[str]]


class NodeDirectory:
    """The connected nodes of a round and the clients they serve.

    ``min_available_nodes``: wait up to ``wait_timeout`` s for this many nodes; after that a
    round goes on with those connected if they are at least ``min_replies``. ``participants``:
    the server's sampling rule (None: every connected node takes part).
    """

    def __init__(
        self,
        *,
        min_available_nodes: int,
        min_replies: int,
        wait_timeout: float,
        participants: Participants | None = None,
    ) -> None:
        self.min_available_nodes = min_available_nodes
        self.min_replies = min_replies
        self.wait_timeout = wait_timeout
        self.participants = participants
        self.clients: dict[int, str] = {}  # node id -> client id (identity, replies)

    def learn(self, node: int, client: str) -> None:
        """Record the client a node answered for."""
        self.clients[node] = client

    def connected(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes (sorted), after waiting for ``min_available_nodes``."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_available_nodes:
                return nodes
            if time.monotonic() >= deadline:
                if len(nodes) >= self.min_replies:
                    log.warning(
                        "round %d: %d of the %d expected nodes connected after %.0f s; "
                        "going on with them",
                        server_round,
                        len(nodes),
                        self.min_available_nodes,
                        self.wait_timeout,
                    )
                    return nodes
                raise RoundFailedError(
                    f"round {server_round}: only {len(nodes)} nodes connected after waiting "
                    f"{self.wait_timeout:.0f} s; min_replies is {self.min_replies}"
                )
            time.sleep(1.0)

    def round_nodes(
        self, server_round: int, grid: Grid, config: ConfigRecord
    ) -> tuple[list[int], list[str] | None]:
        """The nodes a round sends to and its sampled participants (None without sampling).

        With sampling, nodes whose client is not yet known are asked once (an identity query,
        no model sent); a client served by several nodes is reached through the lowest node.
        """
        nodes = self.connected(grid, server_round)
        if self.participants is None:
            return nodes, None
        unknown = [n for n in nodes if n not in self.clients]
        if unknown:
            self.identify(server_round, unknown, grid, config)
        by_client: dict[str, int] = {}
        for node in sorted(nodes):
            if node in self.clients:
                by_client.setdefault(self.clients[node], node)
        chosen = self.participants(server_round, by_client)
        if len(chosen) < self.min_replies:
            raise RoundFailedError(
                f"round {server_round}: {len(by_client)} clients identified among "
                f"{len(nodes)} connected nodes; min_replies is {self.min_replies}"
            )
        log.info(
            "round %d: sampled %d of %d clients: %s",
            server_round,
            len(chosen),
            len(by_client),
            " ".join(chosen),
        )
        return [by_client[c] for c in chosen], chosen

    def identify(
        self, server_round: int, nodes: list[int], grid: Grid, config: ConfigRecord
    ) -> None:
        """Learn the client id of ``nodes`` (``query.identify``); nodes that do not answer
        validly are left out of this round's draw, with a warning."""
        content = RecordDict({CONFIG: ConfigRecord(dict(config))})
        messages = [
            Message(
                content=content,
                message_type=IDENTIFY,
                dst_node_id=node,
                group_id=f"{server_round}-identify",
            )
            for node in nodes
        ]
        replies = grid.send_and_receive(messages, timeout=self.wait_timeout)
        screen = screen_replies(
            messages,
            replies,
            lambda content, node: (validate_identity(content, node_id=node), None),
            kind="identity reply",
        )
        for drop in screen.dropped:
            log.warning("%s", drop.reason)
        for valid in screen.valid:
            self.learn(valid.node, valid.client)
