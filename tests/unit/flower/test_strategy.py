"""LivarStrategy (livar_merge.flower.strategy) on fake grids: bad replies dropped, rounds failed,
the reduction deterministic and equal to the aggregator, CCVR's moment queries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from flwr.app import ConfigRecord, Error, Message, RecordDict  # noqa: E402

from livar_merge.aggregation import make_aggregator  # noqa: E402
from livar_merge.federated.global_state import global_tensors  # noqa: E402
from livar_merge.federated.install import install_result  # noqa: E402
from livar_merge.federated.server import FederatedServer  # noqa: E402
from livar_merge.flower.strategy import (  # noqa: E402
    FlowerSettings,
    LivarStrategy,
    RoundFailedError,
)
from tests.helpers import (  # noqa: E402
    NUM_CLASSES,
    FakeGrid,
    class_moments,
    packed,
    tiny_peft_vit,
    with_statistics,
)
from tests.helpers import fake_flower_update as fake_update  # noqa: E402


def replies_for(contents: list[RecordDict | Error], node_ids: list[int]) -> list[Message]:
    """Reply messages from ``node_ids`` (error replies for ``Error`` contents)."""
    out = []
    for content, node in zip(contents, node_ids, strict=True):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        out.append(Message(content, reply_to=instruction))
    return out


# ------------------------------------------------------------------------------ strategy
def strategy_for(model: torch.nn.Module, **kw) -> LivarStrategy:
    fresh = tiny_peft_vit(rank=4, alpha=4.0, num_classes=NUM_CLASSES, seed=0)
    fresh.load_state_dict(model.state_dict())
    settings = FlowerSettings(min_replies=kw.pop("min_replies", 0))
    server = FederatedServer(fresh, seed=42, **{"method": "livar", **kw})
    return LivarStrategy(server, settings=settings, config_hash="h" * 64)


def test_strategy_drops_a_bad_reply_and_proceeds(model, caplog):
    updates = [fake_update(model, f"client_{m}", seed=10 + m) for m in range(3)]
    contents = [packed(u) for u in updates]
    contents[1]["metrics"]["omega-a"] = [float("nan")] * 8
    strategy = strategy_for(model, min_replies=2)
    with caplog.at_level("WARNING", logger="flwr.livar"):
        arrays, metrics = strategy.aggregate_train(1, replies_for(contents, [11, 12, 13]))
    assert metrics["replies-accepted"] == 2 and metrics["replies-dropped"] == 1
    assert "node 12 (client 'client_1')" in caplog.text and "'omega-a'" in caplog.text
    outcome = {o["node_id"]: o for o in strategy.history[0].outcomes}
    assert not outcome[12]["accepted"] and outcome[11]["accepted"] and outcome[13]["accepted"]
    # The same as aggregating the two good updates directly and installing the result.
    reference = strategy_for(model, min_replies=2)
    result = make_aggregator("livar").aggregate(
        [updates[0], updates[2]],
        previous_head=reference.server.previous_head(),
        scaling=reference.server.scalings,
    )
    install_result(reference.server.model, result, lora_merge="product", seed=42, round_index=1)
    expected = global_tensors(reference.server.model, "product")
    assert set(arrays) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(torch.from_numpy(arrays[key].numpy()), value)


def test_strategy_fails_the_round_when_too_few_valid_replies(model):
    contents = [packed(fake_update(model, f"client_{m}", seed=20 + m)) for m in range(3)]
    contents[0]["info"]["table-version"] = 7
    error = Error(code=5, reason="Node Unavailable")
    strategy = strategy_for(model, min_replies=2)
    with pytest.raises(RoundFailedError) as err:
        strategy.aggregate_train(3, replies_for([contents[0], error, contents[2]], [1, 2, 3]))
    message = str(err.value)
    assert "round 3: 1 valid replies of 3" in message and "min_replies is 2" in message
    assert "node 1 (client 'client_0')" in message and "table-version" in message
    assert "node 2: error reply (code 5): Node Unavailable" in message
    assert strategy.history == []  # nothing was installed


def test_duplicate_client_ids_keep_the_lowest_node(model):
    update = fake_update(model, "client_0", seed=30)
    other = fake_update(model, "client_1", seed=31)
    strategy = strategy_for(model, min_replies=1)
    _, metrics = strategy.aggregate_train(
        1, replies_for([packed(update), packed(update), packed(other)], [9, 5, 7])
    )
    assert metrics["replies-accepted"] == 2
    dropped = [o for o in strategy.history[0].outcomes if not o["accepted"]]
    assert [o["node_id"] for o in dropped] == [9] and "already sent by node 5" in dropped[0][
        "reason"
    ]


@pytest.mark.parametrize(
    "method", ["livar", "fedavg", "livar-alpha", "livar-sigma", "regmean", "fisher", "fedproto"]
)
def test_reduction_is_deterministic_and_equals_the_aggregator(model, method):
    """Any reply order gives the same global model, that of the registry's aggregator on the
    updates in client-id order, installed as livar-fed does."""
    needs = set(make_aggregator(method).needs)
    updates = [
        with_statistics(fake_update(model, cid, seed=40 + i), needs, seed=40 + i)
        for i, cid in enumerate(["client_10", "client_2", "client_1"])
    ]
    contents = [packed(u) for u in updates]
    results = []
    for order in itertools.permutations(range(3)):
        strategy = strategy_for(model, method=method, min_replies=3)
        arrays, _ = strategy.aggregate_train(
            1, replies_for([contents[i] for i in order], [100 + i for i in order])
        )
        assert [u.client_id for u in strategy.history[0].updates] == [
            "client_1",
            "client_2",
            "client_10",
        ]
        results.append({k: arrays[k].numpy() for k in arrays})
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in results[0])
    reference = strategy_for(model, method=method)
    result = make_aggregator(method).aggregate(
        [updates[2], updates[1], updates[0]],
        previous_head=reference.server.previous_head(),
        scaling=reference.server.scalings,
    )
    install_result(reference.server.model, result, lora_merge="product", seed=42, round_index=1)
    for key, value in global_tensors(reference.server.model, "product").items():
        torch.testing.assert_close(torch.from_numpy(results[0][key]), value, msg=key)
    if method == "fedproto":  # the global prototypes go out with the next train message
        grid = FakeGrid([1, 2])
        messages = list(
            strategy.configure_train(2, strategy.download.current, ConfigRecord(), grid)
        )
        sent = messages[0].content["broadcast"]["prototypes"].numpy()
        np.testing.assert_allclose(sent, result.details["prototypes"], rtol=1e-6)
    else:
        grid = FakeGrid([1, 2])
        messages = list(
            strategy.configure_train(2, strategy.download.current, ConfigRecord(), grid)
        )
        assert "broadcast" not in messages[0].content  # nothing for methods that send nothing


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_ccvr_queries_moments_and_retrains_the_head(model, covariance):
    """After aggregating, the strategy sends the new global model as a QUERY to the nodes whose
    replies it accepted, drops a bad moment reply, and re-trains the head exactly as
    CCVRAggregator.refine_head does on the valid moments in client-id order."""
    from livar_merge.federated.data import derive_seed
    from livar_merge.flower.messages import pack_moments

    full = covariance == "full"
    updates = [fake_update(model, f"client_{m}", seed=60 + m) for m in range(3)]
    moments = {m: class_moments(70 + m, full=full) for m in range(3)}

    def respond(node: int, message: Message):
        assert message.metadata.message_type == "query"
        assert message.content["config"]["ccvr-covariance"] == covariance
        m = node - 20
        if m == 1:  # a reply with a NaN mean is dropped with its reason
            bad = {**moments[m], "mean": np.full_like(moments[m]["mean"], np.nan)}
            return pack_moments(bad, client_id=f"client_{m}", partition_id=m)
        return pack_moments(moments[m], client_id=f"client_{m}", partition_id=m)

    grid = FakeGrid([20, 21, 22], respond)
    options = {"ccvr_covariance": covariance, "ccvr_samples": 16, "ccvr_epochs": 1}
    strategy = strategy_for(model, method="livar+ccvr", method_options=options, min_replies=2)
    strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord({"x": 1}), grid)
    arrays, _ = strategy.aggregate_train(1, replies_for([packed(u) for u in updates], [20, 21, 22]))
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(m.metadata.dst_node_id for m in queries) == [20, 21, 22]
    assert queries[0].content["config"]["x"] == 1  # the run's options travel with the query
    entry = strategy.history[0]
    dropped = [o for o in entry.outcomes if not o["accepted"]]
    assert len(dropped) == 1 and "client 'client_1'" in dropped[0]["reason"]
    assert "'mean' holds NaN/Inf" in dropped[0]["reason"] and entry.moments_seconds > 0

    reference = strategy_for(model, method="livar+ccvr", method_options=options)
    aggregator = reference.server.aggregator
    result = aggregator.aggregate(
        updates,
        previous_head=reference.server.previous_head(),
        scaling=reference.server.scalings,
    )
    install_result(reference.server.model, result, lora_merge="product", seed=42, round_index=1)
    weight, bias = reference.server.previous_head()
    weight, bias = aggregator.refine_head(
        weight, bias, [moments[0], moments[2]], seed=derive_seed(42, 1, "ccvr")
    )
    torch.testing.assert_close(torch.from_numpy(arrays["head/weight"].numpy()), weight)
    torch.testing.assert_close(torch.from_numpy(arrays["head/bias"].numpy()), bias)
    assert not torch.equal(weight, result.head.weight)  # the calibration changed the head


def test_ccvr_last_round_only_queries_in_that_round(model):
    from livar_merge.flower.messages import pack_moments

    def respond(node: int, message: Message):
        m = node - 1
        return pack_moments(class_moments(m), client_id=f"client_{m}", partition_id=m)

    grid = FakeGrid([1, 2], respond)
    options = {"ccvr_samples": 16, "ccvr_epochs": 1, "ccvr_rounds": "last"}
    strategy = strategy_for(model, method="ccvr", method_options=options, rounds=2)
    arrays = strategy.initial_arrays()
    for server_round in (1, 2):
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        updates = [fake_update(model, f"client_{m}", seed=90 + m) for m in range(2)]
        arrays, _ = strategy.aggregate_train(
            server_round, replies_for([packed(u) for u in updates], [1, 2])
        )
        queries = [m for m in grid.sent if m.metadata.message_type == "query"]
        assert len(queries) == (0 if server_round == 1 else 2)
    assert [e.moments_seconds > 0 for e in strategy.history] == [False, True]


def test_ccvr_fails_the_round_with_too_few_moment_replies(model):
    updates = [fake_update(model, f"client_{m}", seed=80 + m) for m in range(2)]
    error = Error(code=0, reason="ClientApp crashed")
    grid = FakeGrid([1, 2], lambda node, message: error)
    strategy = strategy_for(model, method="ccvr", min_replies=1)
    strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid)
    with pytest.raises(RoundFailedError, match="0 valid CCVR moment replies of 2 nodes"):
        strategy.aggregate_train(1, replies_for([packed(u) for u in updates], [1, 2]))


def test_strategy_rejects_needs_the_wire_format_does_not_carry():
    from livar_merge.errors import ConfigError
    from livar_merge.flower.strategy import check_method

    check_method("regmean")  # every method of the registry runs over Flower
    with pytest.raises(ConfigError, match="method 'newton' needs \\['hessian'\\].*does not carry"):
        check_method("newton", {"omega", "hessian"})
