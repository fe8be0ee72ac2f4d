"""Client sampling in LivarStrategy on fake grids: nodes identified once, the sampled nodes are
those of livar-fed's draw among the connected clients, failures and min_replies."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from flwr.app import ConfigRecord, Error  # noqa: E402

from livar_merge.errors import ConfigError, RoundFailedError  # noqa: E402
from livar_merge.federated.sampling import sample_participants  # noqa: E402
from livar_merge.federated.server import FederatedServer  # noqa: E402
from livar_merge.flower.messages import IDENTIFY, pack_identity  # noqa: E402
from livar_merge.flower.strategy import FlowerSettings, LivarStrategy  # noqa: E402
from tests.helpers import NUM_CLASSES, FakeGrid, tiny_peft_vit  # noqa: E402

# node id -> client of the node (node ids are arbitrary, as Flower's)
NODES = {905: "client_2", 17: "client_0", 4411: "client_1", 230: "client_3", 66: "client_4"}


def sampling_strategy(k: int, min_replies: int = 0) -> LivarStrategy:
    model = tiny_peft_vit(rank=4, alpha=4.0, num_classes=NUM_CLASSES, seed=0)
    server = FederatedServer(model, seed=42, method="livar", clients_per_round=k)
    return LivarStrategy(
        server, settings=FlowerSettings(min_replies=min_replies), min_available_nodes=5
    )


def identity_grid(nodes: dict[int, str], broken: tuple[int, ...] = ()) -> FakeGrid:
    def respond(node, message):
        if message.metadata.message_type != IDENTIFY:
            return None
        if node in broken:
            return Error(code=1, reason="node fell over")
        return pack_identity(client_id=nodes[node], partition_id=int(nodes[node][-1]))

    return FakeGrid(list(nodes), respond)


def train_destinations(messages) -> list[int]:
    return [m.metadata.dst_node_id for m in messages]


def test_sampled_nodes_are_those_of_the_inprocess_draw_and_identified_once():
    strategy = sampling_strategy(2)
    grid = identity_grid(NODES)
    node_of = {c: n for n, c in NODES.items()}
    for r in (1, 2, 3):
        messages = list(
            strategy.configure_train(r, strategy.initial_arrays(), ConfigRecord(), grid)
        )
        expected = sample_participants(NODES.values(), 2, seed=42, round_index=r)
        assert train_destinations(messages) == [node_of[c] for c in expected]
        assert strategy.rounds.in_flight.participants == expected
        assert all(m.metadata.message_type == "train" for m in messages)
    identity_queries = [m for m in grid.sent if m.metadata.message_type == IDENTIFY]
    assert sorted(m.metadata.dst_node_id for m in identity_queries) == sorted(NODES)  # once each


def test_a_node_that_fails_to_identify_is_left_out_of_the_draw(caplog):
    strategy = sampling_strategy(2)
    grid = identity_grid(NODES, broken=(905,))
    with caplog.at_level("WARNING", logger="flwr.livar"):
        strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid)
    assert "node 905" in caplog.text and "node fell over" in caplog.text
    available = [c for n, c in NODES.items() if n != 905]
    assert strategy.rounds.in_flight.participants == sample_participants(
        available, 2, seed=42, round_index=1
    )
    # asked again next round, and then in the draw
    grid.respond = identity_grid(NODES).respond
    strategy.configure_train(2, strategy.initial_arrays(), ConfigRecord(), grid)
    assert strategy.rounds.in_flight.participants == sample_participants(
        NODES.values(), 2, seed=42, round_index=2
    )


def test_a_client_served_by_two_nodes_is_sent_to_the_lowest_node():
    nodes = {**NODES, 3: "client_2"}  # node 3 serves client_2 as node 905 does
    # a round whose draw holds client_2 (the case under test must occur, not be skipped)
    drawn = [
        r
        for r in range(1, 21)
        if "client_2" in sample_participants(NODES.values(), 4, seed=42, round_index=r)
    ]
    assert drawn, "client_2 is never drawn in rounds 1..20: the test would check nothing"
    r = drawn[0]
    expected = sample_participants(NODES.values(), 4, seed=42, round_index=r)
    assert "client_2" in expected
    strategy = sampling_strategy(4)
    messages = strategy.configure_train(
        r, strategy.initial_arrays(), ConfigRecord(), identity_grid(nodes)
    )
    destinations = train_destinations(messages)
    node_of = {c: n for n, c in NODES.items()} | {"client_2": 3}  # the lowest of 3 and 905
    assert destinations == [node_of[c] for c in expected]
    assert 3 in destinations and 905 not in destinations
    assert strategy.rounds.in_flight.participants == expected


def test_min_replies_counts_among_the_sampled_nodes():
    assert sampling_strategy(3).min_replies == 2  # majority of the 3 sampled, not of the 5
    assert sampling_strategy(3, min_replies=3).min_replies == 3
    with pytest.raises(ConfigError, match="min_replies 4 exceeds clients_per_round 3"):
        sampling_strategy(3, min_replies=4)


def test_too_few_identified_clients_fail_the_round():
    strategy = sampling_strategy(3)  # min_replies 2
    grid = identity_grid(NODES, broken=(905, 17, 4411, 230))
    with pytest.raises(RoundFailedError, match="1 clients identified among 5 connected nodes"):
        strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid)
