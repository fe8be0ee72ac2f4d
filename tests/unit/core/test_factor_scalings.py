"""``merge_lora(mode="factors")`` with clients' own scalings: the ratio ``s_m / s`` goes into B
only, ``B = sum_m w_m (s_m / s) B_m`` and ``A = sum_m w_m A_m`` (as Fisher averaging folds it),
checked against plain float64 numpy sums written out client by client."""

import numpy as np
import pytest
import torch

from livar_merge.lora import merge_lora

SHAPES = {"blk.0.qkv": (9, 7), "blk.0.fc2": (6, 11)}
RANK = 3


def random_states(num_clients, seed):
    """One float64 state per client, every client of rank ``RANK``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            key: torch.randn(*shape, generator=gen, dtype=torch.float64)
            for layer, (d, k) in SHAPES.items()
            for key, shape in (
                (f"{layer}.lora_A.weight", (RANK, k)),
                (f"{layer}.lora_B.weight", (d, RANK)),
            )
        }
        for _ in range(num_clients)
    ]


def reference_factors(states, weights, own, server):
    """``{layer: (sum_m w_ml (s_ml / s) B_ml, sum_m w_ml A_ml)}``, a numpy loop over clients.

    ``weights [M, L]``; ``own[m][l]``: client m's scaling of layer l; ``server``: s."""
    out = {}
    for l, layer in enumerate(SHAPES):
        d, k = SHAPES[layer]
        b_sum, a_sum = np.zeros((d, RANK)), np.zeros((RANK, k))
        for m, state in enumerate(states):
            b_sum += weights[m, l] * (own[m][l] / server) * state[f"{layer}.lora_B.weight"].numpy()
            a_sum += weights[m, l] * state[f"{layer}.lora_A.weight"].numpy()
        out[layer] = (b_sum, a_sum)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factors_merge_folds_own_scalings_into_b_only(seed):
    rng = np.random.default_rng(seed)
    states = random_states(4, seed)
    weights = rng.uniform(0.1, 1.0, size=(4, len(SHAPES)))
    own = rng.uniform(0.2, 3.0, size=(4, len(SHAPES)))
    server = 0.75
    client_scalings = [dict(zip(SHAPES, row, strict=True)) for row in own]
    merged = merge_lora(
        states, weights, mode="factors", scaling=server, client_scalings=client_scalings
    )
    expected = reference_factors(states, weights, own, server)
    for layer, (b_ref, a_ref) in expected.items():
        delta = merged[layer]
        assert delta.scaling == server and delta.rank == RANK
        np.testing.assert_allclose(delta.B.numpy(), b_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(delta.A.numpy(), a_ref, rtol=1e-12, atol=1e-12)


def test_factors_merge_with_unit_ratios_changes_nothing():
    states = random_states(3, seed=7)
    weights = np.array([0.2, 0.3, 0.5])
    plain = merge_lora(states, weights, mode="factors", scaling=0.5)
    same = merge_lora(
        states, weights, mode="factors", scaling=0.5, client_scalings=[0.5, None, 0.5]
    )
    expected = reference_factors(states, np.repeat(weights[:, None], 2, 1), [[0.5] * 2] * 3, 0.5)
    for layer, (b_ref, a_ref) in expected.items():
        assert torch.equal(same[layer].B, plain[layer].B)
        assert torch.equal(same[layer].A, plain[layer].A)
        np.testing.assert_allclose(plain[layer].B.numpy(), b_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(plain[layer].A.numpy(), a_ref, rtol=1e-12, atol=1e-12)


def test_product_and_svd_still_carry_the_ratio_once():
    """The product modes fold ``s_m / s`` once into the product (unchanged by the fix)."""
    states = random_states(3, seed=3)
    weights = np.array([0.2, 0.3, 0.5])
    own = [2.0, 0.5, 1.0]
    merged = merge_lora(states, weights, mode="product", scaling=1.0, client_scalings=own)
    for layer in SHAPES:
        expected = sum(
            weights[m] * own[m] * (s[f"{layer}.lora_B.weight"] @ s[f"{layer}.lora_A.weight"])
            for m, s in enumerate(states)
        )
        np.testing.assert_allclose(merged[layer].to_dense().numpy(), expected.numpy(), rtol=1e-12)
