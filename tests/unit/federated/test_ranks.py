"""Clients of other LoRA ranks (livar_merge.federated.ranks, client_ranks options): the cycling
rule and its validation, the start of a client model of another rank in product and svd mode
against dense float64 references, the svd install padding."""

import numpy as np
import pytest
import torch

from livar_merge.errors import ConfigError, GlobalStateError
from livar_merge.federated.config import cycled_rank
from livar_merge.federated.install import install_result
from livar_merge.federated.ranks import (
    copy_non_lora_state,
    lora_factors,
    model_rank,
    start_lora,
    start_truncation_energy,
)
from livar_merge.lora import LoraDelta
from livar_merge.lora_view import peft_scalings
from tests.helpers import NUM_CLASSES, tiny, tiny_peft_vit


def test_client_ranks_are_one_per_client_or_cycled():
    assert [cycled_rank([4, 8, 16], m, 2) for m in range(7)] == [4, 8, 16, 4, 8, 16, 4]
    assert cycled_rank([], 5, 2) == 2
    config = tiny(client_ranks=[2, 8])
    assert config.client_rank_list() == [2, 8, 2] and config.mixed_ranks()
    assert not tiny().mixed_ranks() and not tiny(client_ranks=[4]).mixed_ranks()
    assert tiny(client_ranks="2,4 8").client_ranks == [2, 4, 8]  # file / run-config strings


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_ranks": [2, 4], "lora_merge": "factors"}, "lora_merge 'factors'"),
        ({"client_ranks": [8], "lora_merge": "factors"}, "got ranks [4, 8]"),
        ({"client_ranks": [2, 4], "method": "fisher"}, "'fisher' needs one LoRA rank"),
        ({"client_ranks": [2, 4], "paired": ["fisher"]}, "'fisher' needs one LoRA rank"),
        ({"client_ranks": [2, 4, 8, 16]}, "4 ranks for 3 clients"),
        ({"client_ranks": [0]}, ">= 1"),
    ],
)
def test_refused_client_ranks_name_the_reason(options, message):
    with pytest.raises(ConfigError, match="client_ranks") as err:
        tiny(**options)
    assert message in str(err.value)


def test_client_ranks_pass_with_methods_that_merge_products():
    for options in ({"lora_merge": "svd"}, {"method": "regmean"}, {"paired": ["fedavg"]}):
        assert tiny(client_ranks=[2, 8], **options).mixed_ranks()


def dense(model, layer):
    """``s B A`` of a LoRA layer in float64."""
    b, a = lora_factors(model)[layer]
    return peft_scalings(model)[layer] * b.detach().double() @ a.detach().double()


@pytest.fixture
def global_model():
    """A rank-4 model with a non-zero LoRA product of full rank 4 on every layer."""
    model = tiny_peft_vit(rank=4, alpha=8.0, num_classes=NUM_CLASSES, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b, a in lora_factors(model).values():
            b.copy_(torch.randn(b.shape, generator=gen))
            a.copy_(torch.randn(a.shape, generator=gen))
    return model


def test_model_rank_refuses_a_model_without_lora():
    with pytest.raises(GlobalStateError, match="model has no LoRA layer of adapter 'default'"):
        model_rank(torch.nn.Linear(3, 2))


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_svd_start_is_the_global_product_refactorised(global_model, rank):
    client = tiny_peft_vit(rank=rank, alpha=8.0, num_classes=NUM_CLASSES, seed=5)
    copy_non_lora_state(global_model, client)
    energies = start_lora(client, global_model, lora_merge="svd", seed=3, round_index=2)
    assert model_rank(client) == rank
    for layer, (b, a) in lora_factors(client).items():
        target = dense(global_model, layer).numpy()
        got = dense(client, layer).numpy()
        u, s, vh = np.linalg.svd(target)
        keep = min(rank, 4)
        best = (u[:, :keep] * s[:keep]) @ vh[:keep]  # Eckart-Young: the best rank-r_m start
        np.testing.assert_allclose(got, best, atol=1e-4 * np.abs(target).max())
        expected_energy = float((s[keep:] ** 2).sum() / (s**2).sum())
        assert energies[layer] == pytest.approx(expected_energy, abs=1e-6)
        if rank > 4:  # exact; the extra rank: B columns 0, fresh (non-zero) A rows
            assert energies[layer] == pytest.approx(0.0, abs=1e-9)
            assert torch.all(b[:, 4:] == 0) and torch.all(a[4:].abs().sum(1) > 0)
    assert start_truncation_energy(global_model, rank) == pytest.approx(energies, abs=1e-9)


def test_svd_start_from_a_zero_product_is_a_restart():
    global_model = tiny_peft_vit(rank=4, alpha=8.0, num_classes=NUM_CLASSES, seed=0)  # B = 0
    client = tiny_peft_vit(rank=2, alpha=8.0, num_classes=NUM_CLASSES, seed=5)
    energies = start_lora(client, global_model, lora_merge="svd", seed=3, round_index=1)
    again = tiny_peft_vit(rank=2, alpha=8.0, num_classes=NUM_CLASSES, seed=6)
    start_lora(again, global_model, lora_merge="product", seed=3, round_index=1)
    assert set(energies.values()) == {0.0}
    for (b, a), (b2, a2) in zip(
        lora_factors(client).values(), lora_factors(again).values(), strict=True
    ):
        assert torch.all(b == 0) and torch.equal(b, b2) and torch.equal(a, a2)
        assert a.abs().sum() > 0  # not a dead LoRA


def test_product_start_restarts_per_round_and_rank(global_model):
    client = tiny_peft_vit(rank=8, alpha=8.0, num_classes=NUM_CLASSES, seed=5)
    assert start_lora(client, global_model, lora_merge="product", seed=3, round_index=2) == {}
    first = {k: a.detach().clone() for k, (_, a) in lora_factors(client).items()}
    assert all(torch.all(b == 0) for b, _ in lora_factors(client).values())
    start_lora(client, global_model, lora_merge="product", seed=3, round_index=2)
    assert all(torch.equal(first[k], a) for k, (_, a) in lora_factors(client).items())
    start_lora(client, global_model, lora_merge="product", seed=3, round_index=3)
    assert not any(torch.equal(first[k], a) for k, (_, a) in lora_factors(client).items())


def test_copy_non_lora_state_copies_frozen_weights_and_head(global_model):
    client = tiny_peft_vit(rank=2, alpha=8.0, num_classes=NUM_CLASSES, seed=7)
    copy_non_lora_state(global_model, client)
    source = global_model.state_dict()
    for key, value in client.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, source[key]), key


def test_svd_install_pads_a_merge_below_the_model_rank(global_model):
    """Fewer components in all than the global rank (one low-rank participant): the product is
    the merge, the missing B columns are 0 and their A rows trainable."""
    gen = torch.Generator().manual_seed(2)
    lora = {}
    for layer, (b, a) in lora_factors(global_model).items():
        lora[layer] = LoraDelta(
            scaling=2.0,
            B=torch.randn(b.shape[0], 2, generator=gen),
            A=torch.randn(2, a.shape[1], generator=gen),
        )
    weight, bias = torch.zeros(NUM_CLASSES, 32), torch.zeros(NUM_CLASSES)
    result = type("R", (), {"lora": lora, "head": type("H", (), {"weight": weight, "bias": bias})})
    install_result(global_model, result, lora_merge="svd", seed=0, round_index=1)  # type: ignore[arg-type]
    for layer, (b, a) in lora_factors(global_model).items():
        expected = 2.0 * lora[layer].B.double() @ lora[layer].A.double()
        torch.testing.assert_close(dense(global_model, layer), expected)
        assert torch.all(b[:, 2:] == 0) and torch.all(a[2:].abs().sum(1) > 0)
