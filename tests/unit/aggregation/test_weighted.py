"""The weighted aggregators (fedavg, livar, livar-alpha, livar-sigma) against independent
computations, and their refusal of bad updates."""

import numpy as np
import pytest
import torch

from livar_merge import ClientUpdateError, GShapTable
from livar_merge.aggregation import make_aggregator
from tests.helpers import TOY_LAYERS as LAYERS
from tests.helpers import brute_force_alpha, make_updates


def expected_merge(updates, lora_w, head_w):
    """Independent: dense Eq. 3 sums and row-by-row head sums with explicit loops."""
    deltas = {}
    for l, layer in enumerate(LAYERS):
        deltas[layer] = sum(
            lora_w[m, l] * (u.lora[f"{layer}.lora_B.weight"] @ u.lora[f"{layer}.lora_A.weight"])
            for m, u in enumerate(updates)
        )
    weight = torch.stack(
        [
            sum(head_w[m, c] * u.head_weight[c] for m, u in enumerate(updates))
            for c in range(head_w.shape[1])
        ]
    )
    return deltas, weight


def variance_weights(updates):
    sig = np.stack([np.where(u.class_present, u.class_sigma, 0.0) for u in updates])
    return sig / sig.sum(0)


def sample_weights(updates, classes):
    n = np.array([u.num_samples for u in updates], dtype=float)
    return np.repeat((n / n.sum())[:, None], classes, 1)


@pytest.mark.parametrize("method", ["fedavg", "livar", "livar-alpha", "livar-sigma"])
def test_methods_against_independent_computation(method):
    updates = make_updates()
    for u in updates:
        u.class_present[:] = True
        u.class_sigma = np.abs(u.class_sigma) + 0.1
        u.class_sigma[np.isnan(u.class_sigma)] = 1.0
    table = GShapTable.load("paper-table-a")
    omega_a = np.stack([u.omega_a for u in updates])
    omega_b = np.stack([u.omega_b for u in updates])
    alpha = brute_force_alpha(omega_a, omega_b, table.values)
    n_w = sample_weights(updates, 5)
    lora_w = alpha if method in ("livar", "livar-alpha") else n_w[:, :2]
    head_w = variance_weights(updates) if method in ("livar", "livar-sigma") else n_w
    result = make_aggregator(method, table=table).aggregate(updates, scaling=1.0)
    deltas, weight = expected_merge(updates, lora_w, head_w)
    np.testing.assert_allclose(result.lora_weights, lora_w, rtol=1e-12)
    for layer in LAYERS:
        torch.testing.assert_close(result.lora[layer].to_dense(), deltas[layer])
    torch.testing.assert_close(result.head.weight, weight)


def test_bad_updates_are_rejected_with_the_client_named():
    agg = make_aggregator("livar")
    updates = make_updates()
    updates[2].num_samples = 0
    with pytest.raises(ClientUpdateError, match="client 'c2' trained on 0 samples"):
        agg.aggregate(updates)
    updates = make_updates()
    updates[1].omega_b = np.array([1.0, np.nan])
    with pytest.raises(
        ClientUpdateError,
        match=r"omega_B of client 1 \('c1'\), layer m.blocks.0.mlp.fc1 is not finite",
    ):
        agg.aggregate(updates)
    updates = make_updates()
    updates[3].class_sigma = None
    with pytest.raises(ClientUpdateError, match="client 'c3': class_sigma missing"):
        agg.aggregate(updates)
    updates = make_updates()
    updates[1].client_id = "c0"
    with pytest.raises(ClientUpdateError, match="duplicate client ids"):
        agg.aggregate(updates)
    updates = make_updates()
    updates[0].omega_a = np.ones(3)
    with pytest.raises(ClientUpdateError, match="client 'c0': omega_A has shape"):
        agg.aggregate(updates)
    updates = make_updates()
    updates[2].head_weight[1, 1] = float("inf")
    with pytest.raises(ClientUpdateError, match="client 'c2': head weight holds 1 NaN/Inf"):
        agg.aggregate(updates)


def test_class_no_client_saw_keeps_previous_row():
    updates = make_updates()
    for u in updates:
        u.class_present[3] = False
        u.class_sigma[3] = np.nan
    prev = (torch.full((5, 6), 7.0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    result = make_aggregator("livar").aggregate(updates, previous_head=prev)
    assert result.head.uncovered == (3,)
    assert (result.head.weight[3] == 7.0).all()
