"""The Flower wire format (livar_merge.flower.messages): replies packed, sent, unpacked and
validated; bad replies refused with a reason."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from flwr.app import Array, RecordDict  # noqa: E402

from livar_merge.aggregation import ClientUpdate  # noqa: E402
from livar_merge.federated.global_state import global_tensors  # noqa: E402
from livar_merge.flower.messages import (  # noqa: E402
    InvalidReplyError,
    ReplySpec,
    unpack_reply,
    validate_reply,
)
from livar_merge.lora_view import find_lora_parameters  # noqa: E402
from tests.helpers import (  # noqa: E402
    NUM_CLASSES,
    class_moments,
    flower_table,
    packed,
    with_statistics,
)
from tests.helpers import fake_flower_update as fake_update  # noqa: E402

TABLE = flower_table()


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
    assert back.origin.partition_id == 1 and back.origin.table == TABLE
    assert back.report == {"train_loss": 1.5, "train_accuracy": 0.25}
    assert back.extras == {} and back.origin.node_id is None  # statistics only; no node yet
    validated = validate_reply(content, spec_for(model), node_id=7)
    assert_same_update(update, validated)
    assert validated.origin.node_id == 7


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


def test_every_statistic_of_the_vocabulary_round_trips_the_wire():
    """statistics_tensors then statistics_extras gives back every field of every need (keyed
    fields per key, float64; prototypes as NumPy arrays with their NaN rows)."""
    from livar_merge.aggregation.needs import EXTRA_FIELDS
    from livar_merge.flower.messages import statistics_extras, statistics_tensors

    rng = np.random.default_rng(0)
    proto = rng.normal(size=(3, 4))
    proto[1] = np.nan
    extras = {
        "gram": {"blocks.0.attn.qkv": torch.randn(5, 5), "blocks.1.mlp.fc1": torch.randn(5, 5)},
        "head_gram": torch.randn(5, 5),
        "fisher": {"blocks.0.attn.qkv.lora_A.weight": torch.rand(2, 5), "head.bias": torch.rand(3)},
        "proto_mean": proto,
        "proto_count": np.array([2.0, 0.0, 5.0]),
    }
    tensors = statistics_tensors(extras)
    assert all(t.dtype == torch.float64 for t in tensors.values())
    back = statistics_extras(tensors)
    assert set(back) == set(EXTRA_FIELDS) == set(extras)
    for key in ("gram", "fisher"):
        assert set(back[key]) == set(extras[key])
        for name, value in extras[key].items():
            torch.testing.assert_close(back[key][name], value.double())
    torch.testing.assert_close(back["head_gram"], extras["head_gram"].double())
    assert isinstance(back["proto_mean"], np.ndarray)
    np.testing.assert_array_equal(back["proto_mean"], proto)
    np.testing.assert_array_equal(back["proto_count"], extras["proto_count"])


def test_pack_reply_refuses_extras_that_are_no_statistic(model):
    """A training report put in ``extras`` (where earlier versions kept it) fails loudly
    instead of silently dropping the reply's train metrics."""
    update = fake_update(model, "client_1", seed=1)
    update.extras["train_loss"] = 0.3
    with pytest.raises(InvalidReplyError, match=r"extras holds \['train_loss'\].*report"):
        packed(update)
