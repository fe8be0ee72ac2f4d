"""Replies of another LoRA rank than the global model's on the Flower wire (client_ranks): the
client's scaling travels in the reply's info; a spec of a method that merges mixed ranks accepts
another rank with the global d and k, and refuses what is inconsistent, with a reason."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from livar_merge.federated.global_state import global_tensors  # noqa: E402
from livar_merge.flower.messages import (  # noqa: E402
    INFO,
    SCALING,
    InvalidReplyError,
    ReplySpec,
    validate_reply,
)
from livar_merge.lora_view import find_lora_parameters, lora_state  # noqa: E402
from tests.helpers import NUM_CLASSES, flower_table, packed, tiny_peft_vit  # noqa: E402
from tests.helpers import fake_flower_update as fake_update  # noqa: E402


def spec_for(model: torch.nn.Module, *, mixed_ranks: bool) -> ReplySpec:
    return ReplySpec.from_global(
        global_tensors(model, "product"),
        tuple(find_lora_parameters(model)),
        needs=frozenset({"omega", "sigma"}),
        table=flower_table(),
        config_hash="h" * 64,
        mixed_ranks=mixed_ranks,
    )


@pytest.fixture(scope="module")
def rank8_update():
    """A client update of rank 8 (the global model: rank 4) with its scaling 4 / 8."""
    update = fake_update(tiny_peft_vit(rank=8, alpha=4.0, num_classes=NUM_CLASSES), "client_1", 1)
    update.scaling = 0.5
    return update


def test_another_rank_and_its_scaling_pass_a_mixed_rank_spec(model, rank8_update):
    got = validate_reply(packed(rank8_update), spec_for(model, mixed_ranks=True), node_id=3)
    assert got.scaling == 0.5
    assert all(torch.equal(got.lora[k], v) for k, v in rank8_update.lora.items())
    assert {v.shape[0] for k, v in got.lora.items() if ".lora_A." in k} == {8}


def test_the_global_rank_needs_no_scaling(model):
    update = fake_update(model, "client_0", 0)
    assert validate_reply(packed(update), spec_for(model, mixed_ranks=True)).scaling is None


def test_another_rank_is_refused_by_a_single_rank_spec(model, rank8_update):
    with pytest.raises(InvalidReplyError, match=r"has shape \(8, \d+\), expected \(4, \d+\)"):
        validate_reply(packed(rank8_update), spec_for(model, mixed_ranks=False))


def test_another_rank_without_its_scaling_is_refused(model, rank8_update):
    content = packed(rank8_update)
    del content[INFO][SCALING]
    with pytest.raises(InvalidReplyError, match="lora-scaling.*is missing"):
        validate_reply(content, spec_for(model, mixed_ranks=True))


@pytest.mark.parametrize("scaling", [0.0, -1.0, float("nan")])
def test_a_bad_scaling_is_refused(model, rank8_update, scaling):
    content = packed(rank8_update)
    content[INFO][SCALING] = scaling
    with pytest.raises(InvalidReplyError, match="lora-scaling"):
        validate_reply(content, spec_for(model, mixed_ranks=True))


def test_inconsistent_factors_are_refused(model, rank8_update):
    spec = spec_for(model, mixed_ranks=True)
    layer = next(iter(find_lora_parameters(model)))
    key = f"{layer}.lora_A.weight"
    a_rank6 = dict(rank8_update.lora)
    a_rank6[key] = a_rank6[key][:6]  # A of rank 6, B of rank 8
    bad = type(rank8_update)(**{**rank8_update.__dict__, "lora": a_rank6})
    with pytest.raises(InvalidReplyError, match="ranks \\[6, 8\\]"):
        validate_reply(packed(bad), spec)
    wrong_k = dict(rank8_update.lora)
    wrong_k[key] = torch.zeros(8, 7)
    bad = type(rank8_update)(**{**rank8_update.__dict__, "lora": wrong_k})
    with pytest.raises(InvalidReplyError, match="with k = "):
        validate_reply(packed(bad), spec)


def test_a_per_layer_scaling_is_refused_when_packed(model):
    update = fake_update(model, "client_0", 0)
    update.scaling = {layer: 1.0 for layer in lora_state(model)}
    with pytest.raises(InvalidReplyError, match="one LoRA scaling per client"):
        packed(update)
