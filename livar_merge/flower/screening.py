"""Screening of the replies to one batch of messages: written once for the train replies, CCVR's
moment replies and the identity replies of :class:`livar_merge.flower.strategy.LivarStrategy`.

:func:`screen_replies` matches each reply to the node it answers for, turns error replies and
contents its ``validate`` refuses (:class:`InvalidReplyError`) and requests for the full frozen
weights still standing after :meth:`~livar_merge.flower.download.GlobalDownload.recover` sent
them into :class:`Drop` records, notes
the nodes that sent an error or nothing (their state is unknown afterwards), and orders the valid
replies by client id (then node id); :attr:`Screen.accepted` keeps one reply per client id, the
lowest node's, and :attr:`Screen.duplicates` names the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flwr.app import Message, RecordDict

from livar_merge.errors import InvalidReplyError
from livar_merge.federated.sampling import client_order
from livar_merge.flower.base_sync import resync_request

T = TypeVar("T")


@dataclass(frozen=True)
class Valid(Generic[T]):
    """A reply ``validate`` accepted: its value, the client id it names and its node."""

    value: T
    client: str
    node: int


@dataclass(frozen=True)
class Drop:
    """A reply (or a node's silence) left out, with the reason; ``client`` when known."""

    node: int
    reason: str
    client: str | None = None


@dataclass
class Screen(Generic[T]):
    """The outcome of screening one batch of replies."""

    valid: list[Valid[T]] = field(default_factory=list)  # client-id order, duplicates included
    dropped: list[Drop] = field(default_factory=list)  # error replies and refused contents
    silent: list[int] = field(default_factory=list)  # nodes that did not reply
    errored: list[int] = field(default_factory=list)  # nodes that sent an error reply

    @property
    def accepted(self) -> list[Valid[T]]:
        """One valid reply per client id: the lowest node's."""
        return [
            v for i, v in enumerate(self.valid) if i == 0 or v.client != self.valid[i - 1].client
        ]

    @property
    def duplicates(self) -> list[Drop]:
        """The valid replies :attr:`accepted` leaves out, naming the node that was kept."""
        kept = {v.client: v.node for v in self.accepted}
        return [
            Drop(
                v.node,
                f"reply from node {v.node} (client {v.client!r}): duplicate client id (already "
                f"sent by node {kept[v.client]})",
                v.client,
            )
            for v in self.valid
            if kept[v.client] != v.node
        ]

    @property
    def lost(self) -> list[int]:
        """Nodes whose state is unknown after the exchange (error reply or none)."""
        return sorted({*self.errored, *self.silent})


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of sent messages (ids are set when the Grid pushes them;
    unset ids are left out)."""
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }


def sender(sent: Mapping[str, int], reply: Message) -> int:
    """The node a reply answers for: the destination of its instruction, else its source."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def screen_replies(
    messages: Iterable[Message],
    replies: Iterable[Message],
    validate: Callable[[RecordDict, int], tuple[str, T]],
    *,
    kind: str = "reply",
    inspect: Callable[[int, RecordDict], None] | None = None,
) -> Screen[T]:
    """Screen ``replies`` to ``messages``. ``validate(content, node) -> (client id, value)``
    raises :class:`InvalidReplyError` for a content to drop; ``inspect(node, content)`` sees
    every non-error reply first (e.g. to note the base version it reports); ``kind`` names the
    replies in drop reasons (``"reply"``, ``"moments reply"``, ...)."""
    sent = destinations(messages)
    screen: Screen[T] = Screen()
    answered: set[str] = set()
    for message in replies:
        answered.add(message.metadata.reply_to_message_id)
        node = sender(sent, message)
        if message.has_error():
            screen.errored.append(node)
            screen.dropped.append(
                Drop(
                    node,
                    f"{kind} from node {node}: error reply (code {message.error.code}): "
                    f"{message.error.reason}",
                )
            )
            continue
        if inspect is not None:
            inspect(node, message.content)
        try:
            request = resync_request(message.content)
            if request is not None:
                raise InvalidReplyError(
                    f"{kind} from node {node}: asks for the full frozen weights again after "
                    f"they were sent ({request[1]})"
                )
            client, value = validate(message.content, node)
        except InvalidReplyError as err:
            screen.dropped.append(Drop(node, str(err)))
            continue
        screen.valid.append(Valid(value, client, node))
    screen.silent = [node for message_id, node in sent.items() if message_id not in answered]
    screen.valid.sort(key=lambda v: (client_order(v.client), v.node))
    return screen
