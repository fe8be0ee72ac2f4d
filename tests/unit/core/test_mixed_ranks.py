"""Merging clients of different LoRA ranks (and own scalings) against independent dense sums.

The references are plain float64 loops over clients, ``sum_m w_m s_m B_m @ A_m``, and numpy's
SVD of that dense matrix (Eckart-Young), never livar's stacking or QR path.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livar_merge import ClientUpdateError, GShapTable
from livar_merge.aggregation import make_aggregator, method_spec
from livar_merge.aggregation.types import SVD_ENERGY_KEY
from livar_merge.errors import ConfigError, MethodOptionError
from livar_merge.fedavg import fedavg_lora
from livar_merge.lora import (
    client_factor_lists,
    merge_lora,
    stacked_product_factors,
    to_peft_state_dict,
    truncated_svd,
)
from tests.helpers import TOY_LAYERS, brute_force_alpha, make_updates

SHAPES = {"blk.0.qkv": (9, 7), "blk.0.fc2": (6, 11)}


def mixed_states(ranks, seed, dtype=torch.float64, shapes=SHAPES):
    """One state per client, client ``m`` of rank ``ranks[m]`` on every layer."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        state = {}
        for layer, (d, k) in shapes.items():
            state[f"{layer}.lora_A.weight"] = torch.randn(r, k, generator=gen, dtype=dtype)
            state[f"{layer}.lora_B.weight"] = torch.randn(d, r, generator=gen, dtype=dtype)
        states.append(state)
    return states


def dense_reference(states, weights, scalings):
    """``{layer: sum_m w_ml s_ml B_ml @ A_ml}`` in float64 numpy, a loop over clients.

    ``weights [M, L]``; ``scalings[m][l]``: client m's own scaling of layer l."""
    out = {}
    for l, layer in enumerate(SHAPES):
        total = np.zeros(SHAPES[layer])
        for m, state in enumerate(states):
            b = state[f"{layer}.lora_B.weight"].double().numpy()
            a = state[f"{layer}.lora_A.weight"].double().numpy()
            total += weights[m, l] * scalings[m][l] * (b @ a)
        out[layer] = total
    return out


def best_rank_r(matrix, r):
    """The Eckart-Young best rank-``r`` approximation, its error and discarded energy."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    energy = (s[r:] ** 2).sum() / (s**2).sum()
    return approx, np.sqrt((s[r:] ** 2).sum()), energy


# --------------------------------------------------------------------------- merge_lora
@pytest.mark.parametrize("ranks", [(2, 4, 8), (8, 2), (1, 3, 3, 5)])
@pytest.mark.parametrize("output", ["factors", "dense"])
def test_product_of_mixed_ranks_equals_dense_sum(ranks, output):
    states = mixed_states(ranks, seed=sum(ranks))
    weights = np.random.default_rng(len(ranks)).dirichlet(np.ones(len(ranks)), size=2).T
    merged = merge_lora(states, weights, mode="product", output=output, scaling=0.25)
    expected = dense_reference(states, weights, [[0.25, 0.25]] * len(ranks))
    for layer, delta in merged.items():
        assert delta.scaling == 0.25 and delta.discarded_energy is None
        if output == "factors":
            assert delta.rank == sum(ranks) and delta.dense is None
            torch.testing.assert_close((delta.B @ delta.A).numpy() * 0.25, expected[layer])
        np.testing.assert_allclose(
            delta.to_dense().numpy(), expected[layer], rtol=1e-10, atol=1e-12
        )


def test_hand_made_mixed_ranks_and_scalings():
    """Rank 1 (scaling 2) and rank 2 (scaling 0.5) clients on a 2 x 2 layer, by hand."""
    c0 = {
        "l.lora_B.weight": torch.tensor([[1.0], [0.0]]),
        "l.lora_A.weight": torch.tensor([[1.0, 2.0]]),
    }
    c1 = {
        "l.lora_B.weight": torch.eye(2),
        "l.lora_A.weight": torch.tensor([[0.0, 4.0], [8.0, 0.0]]),
    }
    # 0.5 * 2 * [[1, 2], [0, 0]] + 0.25 * 0.5 * [[0, 4], [8, 0]] = [[1, 2.5], [1, 0]]
    expected = torch.tensor([[1.0, 2.5], [1.0, 0.0]])
    for output in ("factors", "dense"):
        merged = merge_lora(
            [c0, c1], [0.5, 0.25], output=output, scaling=4.0, client_scalings=[2.0, 0.5]
        )["l"]
        assert merged.scaling == 4.0  # the server's: the factors load into a scaling-4 model
        torch.testing.assert_close(merged.to_dense(), expected)
    factors = to_peft_state_dict(
        merge_lora([c0, c1], [0.5, 0.25], scaling=4.0, client_scalings=[2.0, 0.5])
    )
    assert factors["l.lora_B.weight"].shape == (2, 3) and factors["l.lora_A.weight"].shape == (3, 2)
    torch.testing.assert_close(
        4.0 * factors["l.lora_B.weight"] @ factors["l.lora_A.weight"], expected
    )


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    own=st.booleans(),
)
def test_product_property_any_ranks_and_scalings(ranks, seed, own):
    rng = np.random.default_rng(seed)
    states = mixed_states(ranks, seed)
    weights = rng.normal(size=(len(ranks), 2))
    scalings = rng.uniform(0.1, 4.0, size=(len(ranks), 2)) if own else np.full((len(ranks), 2), 1.5)
    client_scalings = [dict(zip(SHAPES, row, strict=True)) for row in scalings] if own else None
    merged = merge_lora(states, weights, scaling=1.5, client_scalings=client_scalings)
    expected = dense_reference(states, weights, scalings)
    for layer, delta in merged.items():
        assert delta.scaling == 1.5 and delta.rank == sum(ranks)
        np.testing.assert_allclose(delta.to_dense().numpy(), expected[layer], rtol=1e-9, atol=1e-9)


def test_stacked_product_factors_rank_blocks():
    bs = [torch.randn(5, r, dtype=torch.float64) for r in (1, 3, 2)]
    as_ = [torch.randn(r, 4, dtype=torch.float64) for r in (1, 3, 2)]
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    for wide in (False, True):  # the weights go on B (d <= k) or on A
        b_in = bs if wide else [b[:3] for b in bs]
        b, a = stacked_product_factors(b_in, as_, w)
        assert b.shape[1] == a.shape[0] == 6
        expected = sum(w[m] * b_in[m] @ as_[m] for m in range(3))
        torch.testing.assert_close(b @ a, expected)


@pytest.mark.parametrize("ranks", [(2, 4, 8), (3, 3, 3)])
@pytest.mark.parametrize("target", [1, 3, 5])
def test_svd_is_the_best_rank_r_approximation_with_its_discarded_energy(ranks, target):
    states = mixed_states(ranks, seed=11)
    weights = np.random.default_rng(3).random((len(ranks), 2))
    merged = merge_lora(states, weights, mode="svd", rank=target, scaling=0.5)
    expected = dense_reference(states, weights, [[1.0, 1.0]] * len(ranks))  # without scaling
    for layer, delta in merged.items():
        approx, error, energy = best_rank_r(expected[layer], target)
        assert delta.rank == target and delta.scaling == 0.5
        product = (delta.B @ delta.A).numpy()
        np.testing.assert_allclose(product, approx, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(expected[layer] - product), error, rtol=1e-8)
        np.testing.assert_allclose(delta.to_dense().numpy(), 0.5 * approx, rtol=1e-9, atol=1e-10)
        assert delta.discarded_energy == pytest.approx(energy, rel=1e-9, abs=1e-14)


def test_svd_energy_edge_cases():
    zero = merge_lora(mixed_states((2, 2), 0), [0.0, 0.0], mode="svd")  # a zero product
    assert all(d.discarded_energy == 0.0 for d in zero.values())
    full = merge_lora(mixed_states((1, 2), 0), [1.0, 1.0], mode="svd", rank=3)  # rank >= total
    assert all(d.discarded_energy == pytest.approx(0.0, abs=1e-20) for d in full.values())
    b, a = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    svd = truncated_svd(b, a, 2)
    s = np.linalg.svd((b @ a).numpy(), compute_uv=False)
    np.testing.assert_allclose(svd.singular_values.numpy(), s[:4], rtol=1e-10)  # R = 4
    assert svd.discarded_energy == pytest.approx((s[2:] ** 2).sum() / (s**2).sum(), rel=1e-10)


def test_svd_of_mixed_ranks_needs_the_target_rank():
    states = mixed_states((2, 4), 1)
    with pytest.raises(
        ConfigError,
        match=r"an svd merge without a target rank needs a common rank; got client 0 \('a'\) "
        r"r=2, client 1 \('b'\) r=4 on layer blk.0.qkv .*pass rank=",
    ):
        merge_lora(states, [0.5, 0.5], mode="svd", client_ids=["a", "b"])
    with pytest.raises(ConfigError, match="target rank must be an integer >= 1"):
        merge_lora(states, [0.5, 0.5], mode="svd", rank=0)
    assert merge_lora(mixed_states((3, 3), 1), [1, 1], mode="svd")["blk.0.qkv"].rank == 3


def test_factors_mode_refuses_mixed_ranks():
    with pytest.raises(
        ClientUpdateError,
        match=r"merge mode 'factors' needs a common rank; got client 0 r=2, client 2 r=4 on "
        r"layer blk.0.qkv \(ranks by client: 2, 2, 4\)",
    ):
        merge_lora(mixed_states((2, 2, 4), 0), [1, 1, 1], mode="factors")
    with pytest.raises(ClientUpdateError, match="'factors' needs a common rank"):
        fedavg_lora(mixed_states((2, 4), 0), [3, 4])  # fedavg_lora's default mode is factors
    merged = fedavg_lora(mixed_states((2, 4), 0), [3, 4], mode="product")
    assert merged["blk.0.qkv"].rank == 6


@pytest.mark.parametrize(
    ("key", "shape", "ids", "message"),
    [
        (
            "blk.0.fc2.lora_B.weight",
            (5, 4),
            ["x", "y"],
            r"client 1 \('y'\), layer blk.0.fc2: lora_B has shape \(5, 4\), client 0 has "
            r"\(6, 2\) \(layer size d differs\)",
        ),
        ("blk.0.qkv.lora_A.weight", (4, 8), None, r"client 1, layer blk.0.qkv: lora_A .*size k"),
        (
            "blk.0.qkv.lora_A.weight",
            (3, 7),
            None,
            r"client 1, layer blk.0.qkv: lora_B has shape \(9, 4\) and lora_A \(3, 7\); "
            r"expected B \[d, r\] and A \[r, k\]",
        ),
    ],
)
def test_validation_still_checks_layer_sizes_and_a_b_ranks(key, shape, ids, message):
    states = mixed_states((2, 4), 0)
    states[1][key] = torch.zeros(*shape, dtype=torch.float64)
    with pytest.raises(ClientUpdateError, match=message):
        client_factor_lists(states, client_ids=ids)


def test_validation_names_client_0_and_dtypes_and_keeps_mixed_ranks():
    states = mixed_states((2, 4), 0)
    states[0]["blk.0.qkv.lora_B.weight"] = torch.zeros(9, 2, 1, dtype=torch.float64)
    with pytest.raises(ClientUpdateError, match="client 0, layer blk.0.qkv: lora_B has shape"):
        client_factor_lists(states)
    states = mixed_states((2, 4), 0)
    states[1]["blk.0.fc2.lora_A.weight"] = states[1]["blk.0.fc2.lora_A.weight"].float()
    with pytest.raises(ClientUpdateError, match="client 1, layer blk.0.fc2: lora_A has dtype"):
        client_factor_lists(states)
    lists = client_factor_lists(mixed_states((2, 4, 1), 0))
    assert [b.shape[1] for b in lists["blk.0.qkv"][0]] == [2, 4, 1]


def test_client_scalings_are_checked_and_same_scalings_change_nothing():
    states = mixed_states((3, 3), 2)
    plain = merge_lora(states, [0.3, 0.7], scaling=0.5)
    same = merge_lora(states, [0.3, 0.7], scaling=0.5, client_scalings=[0.5, None])
    for layer in plain:
        assert torch.equal(plain[layer].B, same[layer].B)
        assert torch.equal(plain[layer].A, same[layer].A)
    with pytest.raises(ClientUpdateError, match="1 client scalings for 2 clients"):
        merge_lora(states, [0.3, 0.7], client_scalings=[1.0])
    with pytest.raises(ClientUpdateError, match="client 1: no LoRA scaling given for layer blk.0"):
        merge_lora(states, [0.3, 0.7], client_scalings=[1.0, {"blk.0.qkv": 1.0}])
    with pytest.raises(ClientUpdateError, match="client 0: LoRA scaling of layer blk.0.qkv is nan"):
        merge_lora(states, [0.3, 0.7], client_scalings=[float("nan"), 1.0])
    with pytest.raises(ClientUpdateError, match="server's LoRA scaling is 0.0"):
        merge_lora(states, [0.3, 0.7], scaling=0.0, client_scalings=[1.0, 1.0])


# --------------------------------------------------------------------------- aggregators
def mixed_updates(ranks=(2, 4, 8, 4), seed=0):
    """make_updates' clients with client m's LoRA re-drawn at rank ranks[m]."""
    updates = make_updates(num_clients=len(ranks), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for u, r in zip(updates, ranks, strict=True):
        for layer in TOY_LAYERS:
            d = u.lora[f"{layer}.lora_B.weight"].shape[0]
            k = u.lora[f"{layer}.lora_A.weight"].shape[1]
            u.lora[f"{layer}.lora_B.weight"] = torch.randn(d, r, generator=gen, dtype=torch.float64)
            u.lora[f"{layer}.lora_A.weight"] = torch.randn(r, k, generator=gen, dtype=torch.float64)
        u.class_present[:] = True
        u.class_sigma = np.abs(np.nan_to_num(u.class_sigma, nan=1.0)) + 0.1
    return updates


def update_reference(updates, lora_w, scalings):
    """``{layer: sum_m w_ml s_m B @ A}`` in float64 numpy, by a loop."""
    out = {}
    for l, layer in enumerate(TOY_LAYERS):
        out[layer] = sum(
            lora_w[m, l]
            * scalings[m]
            * (u.lora[f"{layer}.lora_B.weight"].numpy() @ u.lora[f"{layer}.lora_A.weight"].numpy())
            for m, u in enumerate(updates)
        )
    return out


@pytest.mark.parametrize("method", ["fedavg", "livar", "livar-alpha", "fedproto", "ccvr"])
@pytest.mark.parametrize("own_scaling", [False, True])
def test_weighted_aggregators_on_mixed_ranks_equal_the_dense_sum(method, own_scaling):
    updates = mixed_updates()
    for u in updates:
        u.extras.update(proto_mean=np.zeros((5, 6)), proto_count=np.ones(5))
    scalings = [0.5] * len(updates)
    if own_scaling:  # peft's lora_alpha / r with one lora_alpha = 8 for all clients
        scalings = [8.0 / u.lora[f"{TOY_LAYERS[0]}.lora_A.weight"].shape[0] for u in updates]
        for u, s in zip(updates, scalings, strict=True):
            u.scaling = s
    table = GShapTable.load("paper-table-a")
    if method in ("livar", "livar-alpha"):
        omega_a = np.stack([u.omega_a for u in updates])
        omega_b = np.stack([u.omega_b for u in updates])
        lora_w = brute_force_alpha(omega_a, omega_b, table.values)
    else:
        n = np.array([u.num_samples for u in updates], dtype=float)
        lora_w = np.repeat((n / n.sum())[:, None], 2, 1)
    options = {"table": table} if method.startswith("livar") else {}
    result = make_aggregator(method, **options).aggregate(updates, scaling=0.5)
    expected = update_reference(updates, lora_w, scalings)
    np.testing.assert_allclose(result.lora_weights, lora_w, rtol=1e-12)
    assert SVD_ENERGY_KEY not in result.details
    for layer in TOY_LAYERS:
        delta = result.lora[layer]
        assert delta.scaling == 0.5 and delta.rank == 18
        np.testing.assert_allclose(delta.to_dense().numpy(), expected[layer], rtol=1e-10)

    svd = make_aggregator(method, lora_merge="svd", **options)
    result = svd.aggregate(updates, scaling=0.5, rank=3)
    energies = result.details[SVD_ENERGY_KEY]
    assert list(energies) == list(TOY_LAYERS)
    for layer in TOY_LAYERS:
        approx, _, energy = best_rank_r(expected[layer] / 0.5, 3)
        assert result.lora[layer].rank == 3
        np.testing.assert_allclose(
            result.lora[layer].to_dense().numpy(), 0.5 * approx, rtol=1e-8, atol=1e-10
        )
        assert energies[layer] == pytest.approx(energy, rel=1e-9)
    with pytest.raises(ConfigError, match="pass rank="):
        svd.aggregate(updates, scaling=0.5)
    with pytest.raises(
        ClientUpdateError, match=r"'factors' needs a common rank; got client 0 \('c0'\) r=2"
    ):
        make_aggregator(method, lora_merge="factors", **options).aggregate(updates)


def test_same_rank_svd_reports_discarded_energy():
    updates = make_updates(num_clients=4, rank=2)
    result = make_aggregator("fedavg", lora_merge="svd").aggregate(updates, scaling=2.0)
    n = np.array([u.num_samples for u in updates], dtype=float)
    expected = update_reference(updates, np.repeat((n / n.sum())[:, None], 2, 1), [1.0] * 4)
    for layer in TOY_LAYERS:
        assert result.lora[layer].rank == 2
        _, _, energy = best_rank_r(expected[layer], 2)
        assert result.details[SVD_ENERGY_KEY][layer] == pytest.approx(energy, rel=1e-9)


def grams_for(updates, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for u in updates:
        u.extras["gram"] = {}
        for layer in TOY_LAYERS:
            k = u.lora[f"{layer}.lora_A.weight"].shape[1]
            x = torch.randn(30, k, generator=gen, dtype=torch.float64)
            u.extras["gram"][layer] = x.T @ x
        x = torch.cat(
            [torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.ones(30, 1)], 1
        )
        u.extras["head_gram"] = x.T @ x


def test_regmean_takes_mixed_ranks_and_own_scalings():
    updates = mixed_updates()
    grams_for(updates)
    scalings = [1.0, 2.0, 0.5, 3.0]
    for u, s in zip(updates, scalings, strict=True):
        u.scaling = s
    result = make_aggregator("regmean").aggregate(updates, scaling=0.25)
    for layer in TOY_LAYERS:
        grams = [u.extras["gram"][layer].numpy() for u in updates]
        shrunk = [0.5 * g + 0.5 * np.diag(np.diag(g)) for g in grams]
        num = sum(
            s
            * u.lora[f"{layer}.lora_B.weight"].numpy()
            @ u.lora[f"{layer}.lora_A.weight"].numpy()
            @ g
            for u, s, g in zip(updates, scalings, shrunk, strict=True)
        )
        expected = num @ np.linalg.inv(sum(shrunk))
        np.testing.assert_allclose(result.lora[layer].to_dense().numpy(), expected, rtol=1e-5)
        svd = make_aggregator("regmean", lora_merge="svd").aggregate(updates, scaling=0.25, rank=2)
        approx, _, energy = best_rank_r(expected / 0.25, 2)
        np.testing.assert_allclose(
            (svd.lora[layer].B @ svd.lora[layer].A).numpy(), approx, rtol=1e-4, atol=1e-4
        )
        assert svd.details[SVD_ENERGY_KEY][layer] == pytest.approx(energy, rel=1e-6)
    with pytest.raises(ConfigError, match="pass rank="):
        make_aggregator("regmean", lora_merge="svd").aggregate(updates)


def fishers_for(updates, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for u in updates:
        u.extras["fisher"] = {
            k: torch.rand(v.shape, generator=gen, dtype=torch.float64) for k, v in u.lora.items()
        }
        u.extras["fisher"]["head.weight"] = torch.rand(
            u.head_weight.shape, generator=gen, dtype=torch.float64
        )
        u.extras["fisher"]["head.bias"] = torch.rand(
            u.head_bias.shape, generator=gen, dtype=torch.float64
        )


def test_fisher_refuses_mixed_ranks_and_folds_own_scalings():
    updates = mixed_updates((2, 2, 4, 2))
    fishers_for(updates)
    with pytest.raises(
        ClientUpdateError,
        match=r"method 'fisher' \(elementwise averaging\) needs a common rank; got client 0 "
        r"\('c0'\) r=2, client 2 \('c2'\) r=4 on layer m.blocks.0.attn.qkv",
    ):
        make_aggregator("fisher").aggregate(updates)
    updates = make_updates(num_clients=3, rank=2)
    fishers_for(updates)
    scalings = [1.0, 2.0, 0.5]
    for u, s in zip(updates, scalings, strict=True):
        u.scaling = s
    result = make_aggregator("fisher", fisher_floor=1e-3).aggregate(updates, scaling=1.0)
    for layer in TOY_LAYERS:
        key = f"{layer}.lora_B.weight"
        c = np.array(scalings)[:, None, None]
        theta = np.stack([u.lora[key].numpy() for u in updates]) * c
        f = np.stack([u.extras["fisher"][key].numpy() for u in updates]) / c**2 + 1e-3
        np.testing.assert_allclose(result.lora[layer].B.numpy(), (f * theta).sum(0) / f.sum(0))


def test_registry_declares_mixed_ranks():
    flags = {
        name: method_spec(name).mixed_ranks
        for name in (
            "fedavg",
            "livar",
            "livar-alpha",
            "livar-sigma",
            "regmean",
            "fisher",
            "fedproto",
            "ccvr",
            "livar+ccvr",
        )
    }
    assert flags == {**dict.fromkeys(flags, True), "fisher": False}
    method_spec("fisher").check_client_ranks([4, 4, 4])
    with pytest.raises(MethodOptionError, match=r"'fisher' needs one LoRA rank .*\[2, 4\]"):
        method_spec("fisher").check_client_ranks([2, 4, 4])
    with pytest.raises(MethodOptionError, match="lora_merge 'factors' needs one LoRA rank"):
        method_spec("livar").check_client_ranks([2, 4], lora_merge="factors")
    with pytest.raises(MethodOptionError, match="needs the target rank"):
        method_spec("regmean").check_client_ranks([2, 4], lora_merge="svd")
    method_spec("regmean").check_client_ranks([2, 4], lora_merge="svd", rank=4)
    method_spec("livar").check_client_ranks([2, 4, 8], lora_merge="product")
