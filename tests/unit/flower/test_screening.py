"""The one reply screen of the Flower strategy (livar_merge.flower.screening), on hand-made
messages: error replies, refused contents, silent nodes, duplicate client ids and ordering."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, RecordDict

from livar_merge.errors import InvalidReplyError
from livar_merge.flower.screening import screen_replies

pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity


def sent_to(node: int) -> Message:
    """A message to ``node`` with the id the Grid would give it when pushing it."""
    message = Message(RecordDict(), message_type="train", dst_node_id=node, group_id="1")
    message.metadata.__dict__["_message_id"] = f"m{node}"
    return message


def reply(message: Message, client: str | None) -> Message:
    content = RecordDict({"info": ConfigRecord({"client-id": client or ""})})
    return Message(content, reply_to=message)


def validate(content: RecordDict, node: int) -> tuple[str, int]:
    client = str(content["info"]["client-id"])
    if not client:
        raise InvalidReplyError(f"reply from node {node}: no client id")
    return client, node * 10


def test_screen_sorts_drops_and_keeps_the_lowest_node_per_client():
    nodes = [40, 7, 12, 30, 55, 99]
    messages = {n: sent_to(n) for n in nodes}
    replies = [
        reply(messages[40], "client_10"),  # client_10 sorts after client_2 (client order)
        reply(messages[12], "client_2"),
        reply(messages[7], "client_2"),  # the same client from a lower node: kept
        reply(messages[30], None),  # refused by validate
        Message(Error(code=3, reason="node fell over"), reply_to=messages[55]),
    ]  # node 99 stays silent
    seen: list[int] = []
    screen = screen_replies(
        messages.values(), replies, validate, inspect=lambda node, content: seen.append(node)
    )
    assert [(v.client, v.node, v.value) for v in screen.valid] == [
        ("client_2", 7, 70),
        ("client_2", 12, 120),
        ("client_10", 40, 400),
    ]
    assert [(v.client, v.node) for v in screen.accepted] == [("client_2", 7), ("client_10", 40)]
    assert [(d.node, d.client) for d in screen.duplicates] == [(12, "client_2")]
    assert "already sent by node 7" in screen.duplicates[0].reason
    assert [d.node for d in screen.dropped] == [30, 55]
    assert screen.dropped[1].reason == "reply from node 55: error reply (code 3): node fell over"
    assert screen.silent == [99] and screen.errored == [55] and screen.lost == [55, 99]
    assert sorted(seen) == [7, 12, 30, 40]  # every non-error reply is inspected


def test_kind_names_the_replies_and_an_empty_batch_is_empty():
    message = sent_to(3)
    error = Message(Error(code=0, reason="x"), reply_to=message)
    screen = screen_replies([message], [error], validate, kind="moments reply")
    assert screen.dropped[0].reason.startswith("moments reply from node 3: error reply")
    empty = screen_replies([], [], validate)
    assert (empty.valid, empty.dropped, empty.silent, empty.accepted) == ([], [], [], [])
