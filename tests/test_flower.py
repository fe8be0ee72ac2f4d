"""LIVAR on Flower 1.41: wire format, replies, strategy, Simulation and Deployment Engine."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}.items():
    os.environ.setdefault(_key, _value)

pytest.importorskip("flwr")

from flwr.app import Array, ConfigRecord, Error, Message, RecordDict  # noqa: E402

from livar_merge.aggregation import ClientUpdate, make_aggregator  # noqa: E402
from livar_merge.federated.config import resolve_config  # noqa: E402
from livar_merge.federated.install import install_result  # noqa: E402
from livar_merge.federated.peft_keys import global_tensors  # noqa: E402
from livar_merge.federated.server import FederatedServer  # noqa: E402
from livar_merge.flower.messages import (  # noqa: E402
    InvalidReplyError,
    ReplySpec,
    pack_reply,
    unpack_reply,
    validate_reply,
)
from livar_merge.flower.server_app import config_from_run_config  # noqa: E402
from livar_merge.flower.strategy import (  # noqa: E402
    FlowerSettings,
    LivarStrategy,
    RoundFailedError,
)
from livar_merge.signals import find_lora_parameters  # noqa: E402
from livar_merge.tables import GShapTable  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import tiny_peft_vit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLE = GShapTable.load("paper-table-a").identity()
NUM_CLASSES = 5


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need the identity of the running task, which a Flower runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name) or value)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_peft_vit(rank=4, alpha=4.0, num_classes=NUM_CLASSES, seed=0)


def fake_update(model: torch.nn.Module, client_id: str, seed: int) -> ClientUpdate:
    """A plausible client update: perturbed LoRA/head, positive omegas, one absent class."""
    return helpers.fake_update(
        model,
        client_id,
        seed,
        num_classes=NUM_CLASSES,
        max_count=40,
        absent_class=True,
        extra_samples=3,
    )


def with_statistics(update: ClientUpdate, needs: set[str], seed: int) -> ClientUpdate:
    """``update`` plus random statistics of the baselines in ``needs`` (gram, fisher,
    prototypes), shaped as the clients compute them; one class without prototype."""
    g = torch.Generator().manual_seed(seed)
    width = update.head_weight.shape[1]
    if "gram" in needs:
        grams = {}
        for layer in update.layer_names:
            x = torch.randn(64, update.lora[f"{layer}.lora_A.weight"].shape[1], generator=g)
            grams[layer] = (x.T @ x).double()
        x = torch.cat([torch.randn(64, width, generator=g), torch.ones(64, 1)], dim=1)
        update.extras.update(gram=grams, head_gram=(x.T @ x).double())
    if "fisher" in needs:
        fisher = {k: torch.rand(v.shape, generator=g).double() for k, v in update.lora.items()}
        fisher["head.weight"] = torch.rand(update.head_weight.shape, generator=g).double()
        fisher["head.bias"] = torch.rand(update.head_bias.shape, generator=g).double()
        update.extras["fisher"] = fisher
    if "prototypes" in needs:
        counts = np.random.default_rng(seed).integers(1, 30, NUM_CLASSES).astype(np.float64)
        counts[seed % NUM_CLASSES] = 0
        mean = torch.randn(NUM_CLASSES, width, generator=g).double().numpy()
        mean[counts == 0] = np.nan
        update.extras.update(proto_mean=mean, proto_count=counts)
    return update


def packed(update: ClientUpdate, config_hash: str = "h" * 64) -> RecordDict:
    return pack_reply(
        update,
        partition_id=int(update.client_id.rsplit("_", 1)[-1]),
        table=TABLE,
        config_hash=config_hash,
        train_metrics={"train-loss": 1.5, "train-accuracy": 0.25},
    )


def spec_for(
    model: torch.nn.Module, config_hash: str | None = "h" * 64, needs: set[str] | None = None
) -> ReplySpec:
    return ReplySpec.from_global(
        global_tensors(model, "product"),
        tuple(find_lora_parameters(model)),
        needs=frozenset(needs or {"omega", "sigma"}),
        table=TABLE,
        config_hash=config_hash,
    )


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise and rebuild a RecordDict as Flower's object store does."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = get_all_nested_objects(content)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    return inflate_object_from_contents(content.object_id, contents)  # type: ignore[return-value]


def replies_for(contents: list[RecordDict | Error], node_ids: list[int]) -> list[Message]:
    """Reply messages from ``node_ids`` (error replies for ``Error`` contents)."""
    out = []
    for content, node in zip(contents, node_ids, strict=True):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        out.append(Message(content, reply_to=instruction))
    return out


def assert_same_update(a: ClientUpdate, b: ClientUpdate) -> None:
    assert a.client_id == b.client_id and a.num_samples == b.num_samples
    assert a.lora.keys() == b.lora.keys()
    assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    assert torch.equal(a.head_weight, b.head_weight) and torch.equal(a.head_bias, b.head_bias)
    assert a.layer_names == b.layer_names
    for name in ("omega_a", "omega_b", "class_sigma", "class_present", "class_counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------- wire format
def test_pack_unpack_round_trip_over_the_wire(model):
    update = fake_update(model, "client_1", seed=1)
    content = over_the_wire(packed(update))
    back = unpack_reply(content)
    assert_same_update(update, back)
    assert np.isnan(back.class_sigma[~back.class_present]).all()
    assert back.extras["partition_id"] == 1 and back.extras["table"] == TABLE
    assert back.extras["train_loss"] == 1.5
    validated = validate_reply(content, spec_for(model), node_id=7)
    assert_same_update(update, validated)
    assert validated.extras["node_id"] == 7


def _set(record_key: str, key: str, value):
    def mutate(content: RecordDict) -> None:
        content[record_key][key] = value

    return mutate


def _delete(record_key: str, key: str):
    def mutate(content: RecordDict) -> None:
        del content[record_key][key]

    return mutate


LORA_KEY = "lora/base_model.model.blocks.0.attn.qkv.lora_A.weight"
BAD_REPLIES = {
    "missing record": (lambda c: c.__delitem__("info"), "record 'info'"),
    "missing array": (_delete("arrays", "head/bias"), "'head/bias' is missing"),
    "unexpected array": (
        _set("arrays", "lora/extra.lora_A.weight", Array(np.zeros((2, 2), np.float32))),
        "unexpected array 'lora/extra.lora_A.weight'",
    ),
    "wrong shape": (
        _set("arrays", LORA_KEY, Array(np.zeros((3, 32), np.float32))),
        f"'{LORA_KEY}' has shape (3, 32), expected (4, 32)",
    ),
    "wrong dtype": (
        _set("arrays", LORA_KEY, Array(np.zeros((4, 32), np.float64))),
        "dtype float64",
    ),
    "nan in lora": (
        _set("arrays", LORA_KEY, Array(np.full((4, 32), np.nan, np.float32))),
        f"'{LORA_KEY}' holds 128 NaN/Inf",
    ),
    "inf omega": (_set("metrics", "omega-a", [float("inf")] * 8), "'omega-a' holds NaN/Inf"),
    "short omega": (_set("metrics", "omega-b", [1.0] * 7), "'omega-b' holds 7 values"),
    "missing omega": (_delete("metrics", "omega-a"), "'omega-a' is missing"),
    "missing sigma": (_delete("metrics", "class-sigma"), "'class-sigma' is missing"),
    "nan sigma": (_set("metrics", "class-sigma", [float("nan")] * 5), "'class-sigma' holds NaN"),
    "negative counts": (_set("metrics", "class-counts", [-1] * 5), "'class-counts' is negative"),
    "no samples": (_set("metrics", "num-examples", 0), "'num-examples' is 0"),
    "table version": (_set("info", "table-version", 99), "info key 'table-version'"),
    "table checksum": (_set("info", "table-checksum", "sha256:beef"), "'table-checksum'"),
    "missing table": (_delete("info", "table-name"), "'table-name'"),
    "other options": (_set("info", "config-hash", "x" * 64), "info key 'config-hash'"),
    "layer names": (_set("info", "layer-names", ["a"] * 8), "'layer-names' differs"),
    "protocol": (_set("info", "protocol", 2), "info key 'protocol' is 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_validate_reply_rejects_bad_replies_with_a_reason(model, case):
    mutate, expected = BAD_REPLIES[case]
    content = packed(fake_update(model, "client_2", seed=2))
    mutate(content)
    with pytest.raises(InvalidReplyError) as err:
        validate_reply(content, spec_for(model), node_id=4242)
    message = str(err.value)
    assert "node 4242" in message and expected in message, message
    if case != "missing record":
        assert "client 'client_2'" in message


STATISTICS = {"omega", "sigma", "gram", "fisher", "prototypes"}


def test_statistics_round_trip_over_the_wire(model):
    update = with_statistics(fake_update(model, "client_3", seed=3), STATISTICS, seed=3)
    content = over_the_wire(packed(update))
    back = validate_reply(content, spec_for(model, needs=STATISTICS), node_id=1)
    assert_same_update(update, back)
    for key in ("gram", "fisher"):
        assert back.extras[key].keys() == update.extras[key].keys()
        for name, value in update.extras[key].items():
            assert back.extras[key][name].dtype == torch.float64
            assert torch.equal(back.extras[key][name], value), name
    assert torch.equal(back.extras["head_gram"], update.extras["head_gram"])
    np.testing.assert_array_equal(back.extras["proto_mean"], update.extras["proto_mean"])
    np.testing.assert_array_equal(back.extras["proto_count"], update.extras["proto_count"])
    # statistics a method does not need are refused, not silently carried
    with pytest.raises(InvalidReplyError, match="unexpected array 'fisher/"):
        validate_reply(content, spec_for(model, needs={"omega", "sigma", "gram", "prototypes"}))


GRAM_KEY = "gram/base_model.model.blocks.1.mlp.fc2"
BAD_STATISTICS = {
    "gram shape": (_set("arrays", GRAM_KEY, Array(np.eye(32))), f"'{GRAM_KEY}' has shape (32, 32)"),
    "gram nan": (
        _set("arrays", GRAM_KEY, Array(np.full((128, 128), np.nan))),
        f"'{GRAM_KEY}' holds 16384 NaN/Inf",
    ),
    "gram dtype": (
        _set("arrays", GRAM_KEY, Array(np.eye(128, dtype=np.float32))),
        f"'{GRAM_KEY}' has dtype float32",
    ),
    "missing head gram": (_delete("arrays", "head-gram"), "'head-gram' is missing"),
    "negative fisher": (
        _set("arrays", "fisher/head.bias", Array(-np.ones(NUM_CLASSES))),
        "'fisher/head.bias' holds negative values",
    ),
    "nan prototype": (
        _set("arrays", "proto-mean", Array(np.full((NUM_CLASSES, 32), np.nan))),
        "'proto-mean' holds NaN/Inf for class 0",
    ),
    "negative count": (
        _set("arrays", "proto-count", Array(-np.ones(NUM_CLASSES))),
        "'proto-count' holds negative values",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATISTICS))
def test_validate_reply_rejects_bad_statistics(model, case):
    mutate, expected = BAD_STATISTICS[case]
    content = packed(with_statistics(fake_update(model, "client_4", seed=4), STATISTICS, 4))
    mutate(content)
    with pytest.raises(InvalidReplyError) as err:
        validate_reply(content, spec_for(model, needs=STATISTICS), node_id=9)
    message = str(err.value)
    assert "node 9 (client 'client_4')" in message and expected in message, message


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
    install_result(reference.model, result, lora_merge="product", seed=42, round_index=1)
    expected = global_tensors(reference.model, "product")
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
    install_result(reference.model, result, lora_merge="product", seed=42, round_index=1)
    for key, value in global_tensors(reference.model, "product").items():
        torch.testing.assert_close(torch.from_numpy(results[0][key]), value, msg=key)
    if method == "fedproto":  # the global prototypes go out with the next train message
        np.testing.assert_allclose(strategy.prototypes.numpy(), result.details["prototypes"])
        grid = FakeGrid([1, 2])
        messages = list(strategy.configure_train(2, strategy._current, ConfigRecord(), grid))
        sent = messages[0].content["prototypes"]["prototypes"].numpy()
        np.testing.assert_array_equal(sent, strategy.prototypes.numpy())


class FakeGrid:
    """The part of a Flower Grid the strategy uses; ``respond(node, message)`` gives a reply
    content (an ``Error`` for an error reply, None for no reply)."""

    def __init__(self, nodes: list[int], respond=None) -> None:
        self.nodes, self.respond, self.sent = nodes, respond, []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            content = self.respond(message.metadata.dst_node_id, message)
            if content is not None:
                replies.append(Message(content, reply_to=message))
        return replies


def class_moments(seed: int, width: int = 32, full: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 20, NUM_CLASSES).astype(np.float64)
    mean = rng.normal(size=(NUM_CLASSES, width))
    if full:
        x = rng.normal(size=(NUM_CLASSES, 3 * width, width))
        cov = np.einsum("cnd,cne->cde", x, x) / (3 * width)
    else:
        cov = rng.uniform(0.1, 1.0, size=(NUM_CLASSES, width))
    return {"mean": mean, "cov": cov, "count": count}


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
    aggregator = reference.aggregator
    result = aggregator.aggregate(
        updates,
        previous_head=reference.server.previous_head(),
        scaling=reference.server.scalings,
    )
    install_result(reference.model, result, lora_merge="product", seed=42, round_index=1)
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
    options = {"ccvr_samples": 16, "ccvr_epochs": 1}
    strategy = strategy_for(model, method="ccvr", method_options=options, ccvr_round=2)
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


def test_validate_moments_rejects_bad_replies():
    from livar_merge.flower.messages import pack_moments, validate_moments

    good = class_moments(1, width=8, full=False)
    kw = {"num_classes": NUM_CLASSES, "width": 8, "full_covariance": False, "node_id": 3}
    client, back = validate_moments(pack_moments(good, client_id="client_5", partition_id=5), **kw)
    assert client == "client_5"
    for key in good:
        np.testing.assert_array_equal(back[key], good[key])
    cases = {
        "full covariance expected": (
            {**kw, "full_covariance": True},
            good,
            "'cov' has shape (5, 8), expected (5, 8, 8)",
        ),
        "fractional count": (kw, {**good, "count": good["count"] + 0.5}, "fractional counts"),
        "inf covariance": (kw, {**good, "cov": good["cov"] * np.inf}, "'cov' holds NaN/Inf"),
    }
    for options, moments, expected in cases.values():
        content = pack_moments(moments, client_id="client_5", partition_id=5)
        with pytest.raises(InvalidReplyError, match=re.escape(expected)):
            validate_moments(content, **options)
    content = pack_moments(good, client_id="client_5", partition_id=5)
    del content["info"]["client-id"]
    with pytest.raises(InvalidReplyError, match="node 3.*'client-id' is missing"):
        validate_moments(content, **kw)


def test_strategy_rejects_needs_the_wire_format_does_not_carry():
    from livar_merge.flower.strategy import check_method

    check_method("regmean")  # every method of the registry runs over Flower
    with pytest.raises(ValueError, match="needs \\['hessian'\\].*does not carry"):
        check_method("newton", {"omega", "hessian"})


def test_run_config_to_livar_fed_options(tmp_path):
    file = tmp_path / "opts.toml"
    file.write_text('lr = 0.02\nbeta = 0.3\nmethod = "fedavg"\n')
    config, settings = config_from_run_config(
        {
            "preset": "tiny",
            "config-file": str(file),
            "options": "beta=0.1 local-epochs=2",
            "rounds": 3,
            "num-clients": "",
            "min-replies": 2,
            "round-timeout": 60.0,
        }
    )
    assert (config.rounds, config.num_clients, config.lr, config.beta) == (3, 3, 0.02, 0.1)
    assert config.local_epochs == 2 and config.method == "fedavg"
    assert settings.min_replies == 2 and settings.round_timeout == 60.0
    assert settings.resolved_min_replies(5) == 2
    assert FlowerSettings().resolved_min_replies(5) == 3  # default: a majority
    with pytest.raises(ValueError, match="not-an-option"):
        config_from_run_config({"not-an-option": 1})


def test_cli_engine_option_and_refusals(capsys, tmp_path):
    from livar_merge.federated.cli import main

    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--engine", "flower", "--resume"])
    assert "not supported with --engine flower" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--engine", "ray"])
    assert "engine must be one of" in capsys.readouterr().err
    assert (
        resolve_config("tiny", None, {"engine": "flower"}).config_hash()
        == resolve_config("tiny", None, {}).config_hash()
    )


# ---------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    from livar_merge.federated.runner import run_federated

    out = tmp_path_factory.mktemp("inprocess")
    return out, run_federated(resolve_config("tiny", None, {}), out)


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "global.safetensors"))


def assert_accuracies_match(got: list[float], expected: list[float], test_size: int) -> None:
    # Identical computations in other processes; only thread counts may differ, so at most one
    # borderline test prediction may flip (measured: identical).
    assert len(got) == len(expected)
    assert np.allclose(got, expected, rtol=0, atol=1.01 / test_size), (got, expected)


@pytest.mark.slow
def test_simulation_engine_matches_the_inprocess_run(tmp_path, inprocess_run):
    from livar_merge.federated.cli import main

    reference_out, reference = inprocess_run
    out = tmp_path / "flower"
    start = time.perf_counter()
    code = main(["--preset", "tiny", "--engine", "flower", "--out", str(out)])
    seconds = time.perf_counter() - start
    print(f"Simulation Engine, tiny, 3 clients x 2 rounds: {seconds:.1f} s")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["completed_rounds"] == 2
    assert_accuracies_match(summary["accuracy_per_round"], reference["accuracy_per_round"], 200)
    got, expected = load_checkpoint(out), load_checkpoint(reference_out)
    assert got.keys() == expected.keys()
    assert any(k.startswith("base/") for k in got)  # product mode: folded frozen weights
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    for name in ("config.json", "provenance.json", "metrics.csv", "metrics.json", "clients.csv"):
        assert (out / name).is_file(), name
    replies = pd.read_csv(out / "replies.csv")
    assert len(replies) == 6 and replies["accepted"].all()
    alpha = pd.read_csv(out / "alpha.csv")
    pd.testing.assert_frame_equal(
        alpha[["round", "client", "layer", "bin_a", "bin_b"]],
        pd.read_csv(reference_out / "alpha.csv")[["round", "client", "layer", "bin_a", "bin_b"]],
    )
    assert json.loads((out / "config.json").read_text())["config"]["engine"] == "flower"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["regmean", "fisher", "fedproto", "livar+ccvr"])
def test_simulation_engine_runs_the_baselines_as_livar_fed(tmp_path, method):
    """Grams, Fisher and prototypes travel in the replies, FedProto's prototypes back to the
    clients, CCVR's moments through a QUERY round: the same global model as in-process."""
    from livar_merge.federated.cli import main

    args = ["--preset", "tiny", "--method", method, "--fisher-samples", "16"]
    args += ["--ccvr-samples", "32", "--ccvr-epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "inprocess")]) == 0
    assert main([*args, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    reference = json.loads((tmp_path / "inprocess" / "summary.json").read_text())
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert_accuracies_match(summary["accuracy_per_round"], reference["accuracy_per_round"], 200)
    got = load_checkpoint(tmp_path / "flower")
    expected = load_checkpoint(tmp_path / "inprocess")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    clients = pd.read_csv(tmp_path / "flower" / "clients.csv")
    reference_clients = pd.read_csv(tmp_path / "inprocess" / "clients.csv")
    assert list(clients["statistics_bytes"]) == list(reference_clients["statistics_bytes"])
    metrics = pd.read_csv(tmp_path / "flower" / "metrics.csv")
    assert ((metrics["moments_seconds"] > 0) == method.endswith("ccvr")).all()


# ------------------------------------------------------------------ Deployment Engine
MARK = "LIVAR_FLOWER_TEST_MARK"


def marked_processes(token: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``MARK=token``."""
    needle = f"{MARK}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(condition, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
        for p in sorted(logs.glob("*.log"))
    )
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
)
def test_deployment_engine_on_loopback_survives_a_killed_supernode(tmp_path, inprocess_run):
    if not all(shutil.which(t) for t in ("flower-superlink", "flower-supernode", "flwr")):
        pytest.skip("flwr command-line tools not installed")
    if "[tool.flwr.app]" not in (REPO / "pyproject.toml").read_text():
        pytest.skip("not a source checkout with the Flower App config")
    token = uuid.uuid4().hex
    env = {**os.environ, MARK: token, "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "results"
    link_port, *node_ports = free_ports(4)
    started: list[tuple[subprocess.Popen, object]] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        home = tmp_path / f"home-{name}"
        home.mkdir()
        log = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            command,
            env={**env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,  # own process group, killed as a whole
        )
        started.append((proc, log))
        return proc

    begin = time.perf_counter()
    try:
        start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                            "--port", str(link_port)])  # fmt: skip
        wait_for(lambda: port_open(link_port), 60, "the SuperLink to listen", logs)
        nodes = [
            start(
                f"node{m}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={m} num-partitions=3",
                ],
            )
            for m, port in enumerate(node_ports)
        ]
        node_logs = [logs / f"node{m}.log" for m in range(3)]
        wait_for(
            lambda: all("SuperNode ID" in p.read_text(errors="replace") for p in node_logs),
            90,
            "three SuperNodes to connect",
            logs,
        )
        cli_home = tmp_path / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "livar-test"\n\n'
            f'[superlink.livar-test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        submitted = subprocess.run(
            ["flwr", "run", str(REPO), "livar-test", "--format", "json", "--run-config",
             f"preset='tiny' rounds=2 out='{out}' min-replies=2 node-wait-timeout=5.0"],
            env={**env, "FLWR_HOME": str(cli_home)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert json.loads(submitted.stdout)["success"] is True
        metrics = out / "metrics.csv"
        wait_for(
            lambda: metrics.is_file() and len(pd.read_csv(metrics)) >= 1,
            240,
            "round 1 to finish",
            logs,
        )
        killed_id = int(node_logs[2].read_text().split("SuperNode ID:")[1].split()[0])
        os.killpg(nodes[2].pid, signal.SIGKILL)  # crash a SuperNode (and its ClientApps)
        nodes[2].wait(timeout=30)
        wait_for(lambda: (out / "summary.json").is_file(), 240, "the run to finish", logs)
    finally:
        for proc, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc, log in started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                proc.wait(timeout=30)
            log.close()  # type: ignore[attr-defined]
        for pid in marked_processes(token):  # children that left the process groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.2)
    seconds = time.perf_counter() - begin
    print(f"Deployment Engine, 3 SuperNodes x 2 rounds, one killed: {seconds:.1f} s")
    assert marked_processes(token) == [], "processes started by the test are still running"
    assert all(not port_open(p) for p in (link_port, *node_ports))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_rounds"] == 2
    rows = pd.read_csv(out / "metrics.csv")
    assert rows["replies_accepted"].tolist() == [3, 2]
    assert rows["replies_dropped"].tolist() == [0, 1]
    replies = pd.read_csv(out / "replies.csv")
    dropped = replies[~replies["accepted"]]
    assert dropped["round"].tolist() == [2] and dropped["node_id"].tolist() == [killed_id]
    assert "error reply" in dropped["reason"].iloc[0]
    accepted = replies[replies["accepted"] & (replies["round"] == 2)]
    assert sorted(accepted["client"]) == ["client_0", "client_1"]
    # Round 1 had all three clients: the same computation as the in-process run.
    _, reference = inprocess_run
    assert_accuracies_match(
        summary["accuracy_per_round"][:1], reference["accuracy_per_round"][:1], 200
    )


def test_the_readme_client_app_example_trains_with_the_strategy():
    """examples/custom_client_app.py: its ClientApp's replies (a plain peft model, our signals,
    pack_reply) pass the strategy's validation and LIVAR aggregates them, two rounds."""
    import importlib.util

    from flwr.app import Context

    spec = importlib.util.spec_from_file_location(
        "custom_client_app", REPO / "examples" / "custom_client_app.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    strategy = example.make_strategy()
    nodes = [30, 31, 32]
    grid = FakeGrid(nodes)
    arrays = strategy.initial_arrays()
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(1, node, {"partition-id": node - 30}, RecordDict(), {})
            replies.append(example.train(message, context))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert metrics["replies-accepted"] == 3 and metrics["replies-dropped"] == 0
        assert metrics["train-loss"] > 0
    record = strategy.history[-1]
    assert [u.client_id for u in record.updates] == ["client_0", "client_1", "client_2"]
    assert np.isfinite(record.result.lora_weights).all()
    # LIVAR's weights come from the G_SHAP table, not the (equal) sample counts
    assert not np.allclose(record.result.lora_weights, 1 / 3)
