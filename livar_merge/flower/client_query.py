"""The Flower engine's :class:`~livar_merge.aggregation.types.ClientQuery`: a QUERY round trip.

A method's ``after_install`` step (CCVR's head calibration) asks the round's clients for class
feature moments under the installed global model. :class:`FlowerClientQuery` sends the new
global model (light in ``product`` mode, :class:`~livar_merge.flower.base_sync.BaseSync`; full to
a node that asks, :meth:`~livar_merge.flower.download.GlobalDownload.recover`) with the round's
train config to the nodes whose train replies were accepted, screens the moment
replies once (:func:`~livar_merge.flower.screening.screen_replies`), records a drop row for
each refused one and fails the round below ``min_replies``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from livar_merge.aggregation import ClientUpdate
from livar_merge.errors import RoundFailedError
from livar_merge.flower.download import GlobalDownload
from livar_merge.flower.messages import validate_moments
from livar_merge.flower.screening import screen_replies

log = logging.getLogger("flwr.livar")


@dataclass
class FlowerClientQuery:
    """One round's client queries over Flower (see the module docstring).

    ``download``: the strategy's model download (the installed global model, and the full
    frozen weights for a node that asks); ``config``: the round's train ConfigRecord;
    ``head_shape``: ``(classes, width)`` of the global head (what a moments reply must
    match); ``outcomes``: the round's reply rows, to which refused replies are added.
    """

    grid: Grid
    server_round: int
    config: ConfigRecord
    download: GlobalDownload
    head_shape: tuple[int, int]
    min_replies: int
    timeout: float
    outcomes: list[dict[str, Any]]

    def moments(
        self, updates: Sequence[ClientUpdate], *, full_covariance: bool
    ) -> list[dict[str, np.ndarray]]:
        """Class feature moments of the nodes of ``updates`` (``origin.node_id``), validated,
        in client-id order; :class:`RoundFailedError` with fewer than ``min_replies``."""
        nodes = [u.origin.node_id for u in updates]
        if None in nodes:
            raise RoundFailedError("a client query needs the node of every update (origin)")
        covariance = "full" if full_covariance else "diag"
        config = ConfigRecord({**dict(self.config), "ccvr-covariance": covariance})
        messages = [
            Message(
                content=content,
                message_type=MessageType.QUERY,
                dst_node_id=node,
                group_id=f"{self.server_round}-moments",
            )
            for node, content in self.download.installed_contents(
                [int(n) for n in nodes if n is not None], config
            ).items()
        ]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        messages, replies, _ = self.download.recover(
            self.grid,
            messages,
            replies,
            lambda asked: self.download.contents(asked, config),
            self.timeout,
        )
        num_classes, width = self.head_shape

        def validate(content: RecordDict, node: int) -> tuple[str, dict[str, Any]]:
            return validate_moments(
                content,
                num_classes=num_classes,
                width=width,
                full_covariance=full_covariance,
                node_id=node,
            )

        screen = screen_replies(
            messages, replies, validate, kind="moments reply", inspect=self.download.base.confirm
        )
        for node in screen.lost:  # its frozen weights are unknown now
            self.download.base.forget(node)
        for drop in screen.dropped:
            log.warning("dropped %s", drop.reason)
            row = {"round": self.server_round, "node_id": drop.node, "client": None}
            self.outcomes.append({**row, "accepted": False, "reason": drop.reason})
        unique = [valid.value for valid in screen.accepted]
        if len(unique) < self.min_replies:
            raise RoundFailedError(
                f"round {self.server_round}: {len(unique)} valid CCVR moment replies of "
                f"{len(nodes)} nodes asked, min_replies is {self.min_replies}"
            )
        log.info("round %d: CCVR moments from %d nodes", self.server_round, len(unique))
        return unique
