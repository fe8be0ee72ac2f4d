"""The global model as the nodes download it: one home of the strategy's model-side state.

:class:`GlobalDownload` keeps the current global model as an ArrayRecord (rebuilt after every
install), product mode's frozen-weight versions (:class:`~livar_merge.flower.base_sync.BaseSync`,
which reads the server's last install itself) and the payload bytes of the last message each
node was sent (``clients.csv``'s ``download_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from livar_merge.federated.global_state import global_tensors, load_global_tensors
from livar_merge.federated.server import FederatedServer
from livar_merge.flower.base_sync import BaseSync, record_bytes
from livar_merge.flower.messages import from_array_record, to_array_record


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

    def installed_contents(
        self, nodes: Sequence[int], config: ConfigRecord
    ) -> dict[int, RecordDict]:
        """:meth:`contents` of the model the server just installed (client queries)."""
        self.refresh()
        return self.contents(nodes, config)
