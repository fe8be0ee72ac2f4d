"""The global model as the nodes download it: one home of the strategy's model-side state.

:class:`GlobalDownload` keeps the current global model as an ArrayRecord (rebuilt after every
install), product mode's frozen-weight versions (:class:`~livar_merge.flower.base_sync.BaseSync`,
which reads the server's last install itself) and the payload bytes of the messages each node
was sent in the last exchange (``clients.csv``'s ``download_bytes``). :meth:`GlobalDownload.recover`
answers, within the same exchange, the nodes that asked for the full frozen weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from livar_merge.errors import InvalidReplyError
from livar_merge.federated.global_state import global_tensors, load_global_tensors
from livar_merge.federated.server import FederatedServer
from livar_merge.flower.base_sync import BaseSync, record_bytes, resync_request
from livar_merge.flower.messages import from_array_record, to_array_record
from livar_merge.flower.screening import destinations, sender

log = logging.getLogger("flwr.livar")


class GlobalDownload:
    """The messages that carry ``server``'s global model to the nodes (module docstring)."""

    def __init__(self, server: FederatedServer) -> None:
        self.server = server
        self.base = BaseSync(server)  # product mode's frozen-weight versions
        self.current: ArrayRecord | None = None  # the global model as last sent or received
        self.node_bytes: dict[int, int] = {}  # node -> payload bytes of its last message

    def refresh(self) -> ArrayRecord:
        """The server's global model as an ArrayRecord, now (after an install)."""
        self.current = to_array_record(global_tensors(self.server.model, self.server.lora_merge))
        return self.current

    def sync(self, arrays: ArrayRecord) -> None:
        """Make the server's model hold ``arrays`` (a no-op for the record it produced)."""
        if arrays is not self.current:
            load_global_tensors(self.server.model, from_array_record(arrays))
            self.current = arrays
            self.base.reset()  # another model: no node holds its frozen weights

    def contents(
        self,
        nodes: Sequence[int],
        config: ConfigRecord,
        extra: Mapping[str, ArrayRecord] | None = None,
    ) -> dict[int, RecordDict]:
        """The content of each node's message: the global model and ``config`` (plus
        ``extra`` records); in ``product`` mode lighter for nodes holding an earlier version
        of the frozen weights. Records each node's payload bytes (once per distinct message)."""
        arrays = self.current if self.current is not None else self.refresh()
        contents = self.base.contents(list(nodes), arrays, config, dict(extra or {}))
        sizes: dict[int, int] = {}
        for node, content in contents.items():
            if id(content) not in sizes:
                sizes[id(content)] = record_bytes(content)
            self.node_bytes[node] = sizes[id(content)]
        return contents

    def recover(
        self,
        grid: Grid,
        sent: list[Message],
        replies: list[Message],
        contents: Callable[[Sequence[int]], Mapping[int, RecordDict]],
        timeout: float,
    ) -> tuple[list[Message], list[Message], dict[int, str]]:
        """Send the full frozen weights, in the same exchange, to the nodes whose replies ask for
        them (:func:`~livar_merge.flower.base_sync.resync_request`), and wait up to ``timeout`` s
        for their answers. ``contents(nodes)``: the exchange's message content for ``nodes``
        (now the full weights: :class:`BaseSync` forgot them). Returns the messages sent (the
        new ones replacing the light ones), the replies (the new ones replacing the requests)
        and ``{node: why it asked}``; the bytes of both messages count for the node."""
        by_id = destinations(sent)
        asked: dict[int, str] = {}
        kept: list[Message] = []
        for reply in replies:
            try:
                request = None if reply.has_error() else resync_request(reply.content)
            except InvalidReplyError:  # a malformed request: screening drops it with the reason
                request = None
            if request is None:
                kept.append(reply)
                continue
            node = sender(by_id, reply)
            self.base.resync(node, cannot_fold=request[0], reason=request[1])
            asked[node] = request[1]
            log.warning("node %d asks for the full frozen weights: %s", node, request[1])
        if not asked:
            return sent, replies, {}
        first = {node: self.node_bytes.get(node, 0) for node in asked}
        original = {m.metadata.dst_node_id: m for m in sent if m.metadata.dst_node_id in asked}
        resent = [
            Message(
                content=content,
                message_type=original[node].metadata.message_type,
                dst_node_id=node,
                group_id=original[node].metadata.group_id,
            )
            for node, content in contents(sorted(asked)).items()
        ]
        for node in asked:
            self.node_bytes[node] = first[node] + self.node_bytes.get(node, 0)
        answers = list(grid.send_and_receive(resent, timeout=timeout))
        sent = [m for m in sent if m.metadata.dst_node_id not in asked] + resent
        return sent, kept + answers, asked

    def installed_contents(
        self, nodes: Sequence[int], config: ConfigRecord
    ) -> dict[int, RecordDict]:
        """:meth:`contents` of the model the server just installed (client queries)."""
        self.refresh()
        return self.contents(nodes, config)
