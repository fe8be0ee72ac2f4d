import numpy as np
import peft
import pytest
import torch

from livar_merge import ClientUpdateError, merge_lora, peft_scalings, to_peft_state_dict
from livar_merge.errors import ConfigError
from livar_merge.lora import lora_layer_names
from tests.helpers import tiny_peft_vit

LAYERS = {
    "blocks.0.attn.qkv": (24, 12),
    "blocks.0.mlp.fc2": (10, 30),
    "blocks.1.attn.proj": (12, 12),
}


def random_states(num_clients: int, rank: int, seed: int, dtype=torch.float64, adapter=""):
    gen = torch.Generator().manual_seed(seed)
    infix = f".{adapter}" if adapter else ""
    states = []
    for _ in range(num_clients):
        state = {}
        for layer, (d, k) in LAYERS.items():
            state[f"base_model.model.{layer}.lora_A{infix}.weight"] = torch.randn(
                rank, k, generator=gen, dtype=dtype
            )
            state[f"base_model.model.{layer}.lora_B{infix}.weight"] = torch.randn(
                d, rank, generator=gen, dtype=dtype
            )
        state["base_model.model.head.weight"] = torch.randn(3, 12, generator=gen, dtype=dtype)
        states.append(state)
    return states


def dense_sum(states, weights, scaling=1.0):
    """Eq. 3 with an explicit loop over clients: sum_m w_m^l B_m^l A_m^l."""
    out = {}
    for l, layer in enumerate(lora_layer_names(states[0])):
        total = 0
        for m, state in enumerate(states):
            total = total + weights[m, l] * (
                state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]
            )
        out[layer] = scaling * total
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("output", ["factors", "dense"])
def test_product_equals_dense_sum(seed, output):
    rng = np.random.default_rng(seed)
    states = random_states(5, rank=3, seed=seed)
    weights = rng.dirichlet(np.ones(5), size=3).T  # [clients, layers]
    merged = merge_lora(states, weights, mode="product", output=output, scaling=0.5)
    expected = dense_sum(states, weights, scaling=0.5)
    assert list(merged) == list(expected)
    for layer, delta in merged.items():
        if output == "factors":
            assert delta.rank == 15 and delta.dense is None  # M * r, no d x k formed
        torch.testing.assert_close(delta.to_dense(), expected[layer], rtol=1e-6, atol=1e-6)


def test_product_float32_within_tolerance():
    states = random_states(4, rank=4, seed=7, dtype=torch.float32)
    weights = np.full((4, 3), 0.25)
    merged = merge_lora(states, weights)
    expected = dense_sum([{k: v.double() for k, v in s.items()} for s in states], weights)
    for layer, delta in merged.items():
        assert delta.B.dtype == torch.float32
        torch.testing.assert_close(delta.to_dense().double(), expected[layer], rtol=1e-5, atol=1e-5)


def test_factors_mode_is_average_of_factors():
    states = random_states(3, rank=2, seed=1)
    w = np.array([0.2, 0.3, 0.5])
    merged = merge_lora(states, w, mode="factors", scaling=2.0)
    for layer, delta in merged.items():
        b = sum(w[m] * states[m][f"{layer}.lora_B.weight"] for m in range(3))
        a = sum(w[m] * states[m][f"{layer}.lora_A.weight"] for m in range(3))
        torch.testing.assert_close(delta.B, b)
        torch.testing.assert_close(delta.A, a)
        torch.testing.assert_close(delta.to_dense(), 2.0 * b @ a)


@pytest.mark.parametrize("rank", [None, 2, 5])
def test_svd_equals_truncated_svd_of_the_product(rank):
    states = random_states(4, rank=3, seed=2)
    weights = np.random.default_rng(2).random((4, 3))
    merged = merge_lora(states, weights, mode="svd", rank=rank, scaling=0.75)
    expected = dense_sum(states, weights)
    for layer, delta in merged.items():
        target_rank = rank or 3
        u, s, vh = np.linalg.svd(expected[layer].numpy())
        truncated = (u[:, :target_rank] * s[:target_rank]) @ vh[:target_rank]
        assert delta.B.shape[1] == min(target_rank, len(s))
        np.testing.assert_allclose((delta.B @ delta.A).numpy(), truncated, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(delta.to_dense().numpy(), 0.75 * truncated, rtol=1e-6, atol=1e-8)
        # balanced factors: B^T B == A A^T == diag(S_r)
        np.testing.assert_allclose(
            (delta.B.T @ delta.B).numpy(), (delta.A @ delta.A.T).numpy(), atol=1e-8
        )


def test_weight_forms_and_state_dict_naming():
    states = random_states(2, rank=2, seed=3, adapter="default")
    layers = lora_layer_names(states[0])
    assert layers == [f"base_model.model.{name}" for name in LAYERS]
    by_layer = merge_lora(states, {layer: [0.5, 0.5] for layer in layers}, mode="factors")
    by_vector = merge_lora(states, [0.5, 0.5], mode="factors")
    for layer in layers:
        torch.testing.assert_close(by_layer[layer].B, by_vector[layer].B)
    state = to_peft_state_dict(by_vector, adapter_name="default")
    assert set(state) == {k for k in states[0] if "lora_" in k}


def test_peft_round_trip_honours_scaling():
    """Merged factors loaded into a real peft model give the model's own delta weight."""
    clients = [tiny_peft_vit(rank=4, alpha=16.0, seed=s) for s in range(3)]
    for model in clients:  # make B non-zero (peft initialises it to zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
    states = [peft.get_peft_model_state_dict(model) for model in clients]
    scalings = peft_scalings(clients[0])
    assert set(scalings.values()) == {4.0}  # lora_alpha / r
    merged = merge_lora(states, [0.2, 0.3, 0.5], mode="factors", scaling=scalings)
    target = clients[0]
    head = {k: v for k, v in states[0].items() if "lora_" not in k}  # merged separately
    peft.set_peft_model_state_dict(target, {**head, **to_peft_state_dict(merged)})
    for layer, delta in merged.items():
        module = target.get_submodule(layer)
        torch.testing.assert_close(module.get_delta_weight("default"), delta.to_dense())


def test_mismatches_name_client_and_layer():
    states = random_states(3, rank=2, seed=4)
    del states[2]["base_model.model.blocks.0.mlp.fc2.lora_A.weight"]
    with pytest.raises(ClientUpdateError, match=r"client 2 \('c'\): LoRA keys differ.*missing"):
        merge_lora(states, [1, 1, 1], client_ids=["a", "b", "c"])
    states = random_states(3, rank=2, seed=4)
    states[1]["base_model.model.blocks.1.attn.proj.lora_B.weight"] = torch.zeros(
        12, 3, dtype=torch.float64
    )
    with pytest.raises(
        ClientUpdateError,
        match="client 1, layer base_model.model.blocks.1.attn.proj: lora_B has shape",
    ):
        merge_lora(states, [1, 1, 1])
    states = random_states(3, rank=2, seed=4)
    states[2]["base_model.model.blocks.0.attn.qkv.lora_A.weight"] = states[2][
        "base_model.model.blocks.0.attn.qkv.lora_A.weight"
    ].float()
    with pytest.raises(ClientUpdateError, match="client 2.*dtype torch.float32"):
        merge_lora(states, [1, 1, 1])
    states = random_states(3, rank=2, seed=4)
    states[0]["base_model.model.blocks.0.attn.qkv.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(
        ClientUpdateError,
        match="client 0, layer base_model.model.blocks.0.attn.qkv: lora_B holds 1 NaN",
    ):
        merge_lora(states, [1, 1, 1])
    with pytest.raises(ClientUpdateError, match=r"expected \(3 clients, 3 layers\)"):
        merge_lora(random_states(3, 2, 0), np.ones((3, 2)))
    with pytest.raises(ClientUpdateError, match="merge weight of client 1, layer"):
        merge_lora(random_states(3, 2, 0), [1.0, np.inf, 1.0])
    with pytest.raises(ConfigError, match="unknown LoRA merge mode 'mean'"):
        merge_lora(random_states(3, 2, 0), [1, 1, 1], mode="mean")
