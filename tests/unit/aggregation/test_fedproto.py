"""FedProto: pooled prototypes, the prototype loss and the aggregator's prototypes."""

import numpy as np
import pytest
import torch

from livar_merge.aggregation import ClientUpdate, make_aggregator
from livar_merge.aggregation.fedproto import pooled_prototypes
from livar_merge.errors import ClientUpdateError


def test_prototypes_and_their_loss(rng):
    from livar_merge.federated.collectors import prototype_loss

    means = [
        np.array([[1.0, 0.0], [np.nan, np.nan], [2.0, 2.0]]),
        np.array([[3.0, 0.0], [np.nan, np.nan], [np.nan, np.nan]]),
    ]
    counts = [np.array([1, 0, 4]), np.array([3, 0, 0])]
    proto, total = pooled_prototypes(means, counts)
    np.testing.assert_allclose(proto[0], [2.5, 0.0])
    assert np.isnan(proto[1]).all() and total.tolist() == [4, 0, 4]
    np.testing.assert_allclose(proto[2], [2.0, 2.0])
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, 2])
    loss = prototype_loss(feats, labels, torch.as_tensor(proto, dtype=torch.float32))
    assert loss.item() == pytest.approx((2.5**2 + 3**2 + 3**2) / 2)  # class 1 has no prototype


def test_fedproto_aggregator_sends_back_prototypes():
    gen = torch.Generator().manual_seed(0)
    updates = []
    for m in range(2):
        lora = {
            "l.lora_A.weight": torch.randn(2, 3, generator=gen),
            "l.lora_B.weight": torch.randn(4, 2, generator=gen),
        }
        updates.append(
            ClientUpdate(
                client_id=f"c{m}",
                num_samples=10,
                lora=lora,
                head_weight=torch.randn(3, 5),
                head_bias=torch.zeros(3),
                extras={
                    "proto_mean": np.full((3, 5), float(m)),
                    "proto_count": np.array([1, 1, 2]),
                },
            )
        )
    result = make_aggregator("fedproto").aggregate(updates)
    np.testing.assert_allclose(result.details["prototypes"], 0.5)
    del updates[1].extras["proto_mean"]
    with pytest.raises(ClientUpdateError, match="client 'c1' sent no 'proto_mean'"):
        make_aggregator("fedproto").aggregate(updates)
