"""A Flower reply carrying ``lora-scaling`` at the global rank, merged with ``lora_merge``
``factors``: the client's ratio ``s_m / s`` reaches its B once and its A not at all, against a
float64 sum written out client by client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from livar_merge.aggregation import make_aggregator  # noqa: E402
from livar_merge.federated.global_state import global_tensors  # noqa: E402
from livar_merge.flower.messages import ReplySpec, validate_reply  # noqa: E402
from livar_merge.lora_view import find_lora_parameters  # noqa: E402
from tests.helpers import fake_flower_update as fake_update  # noqa: E402
from tests.helpers import flower_table, packed  # noqa: E402

SERVER_SCALING = 1.0  # the fixture model: lora_alpha 4 / rank 4
OWN_SCALINGS = [2.0, None, 0.25]  # client_1 sends no lora-scaling: the server's


def test_reply_scalings_reach_b_once_in_a_factors_merge(model):
    spec = ReplySpec.from_global(
        global_tensors(model, "factors"),
        tuple(find_lora_parameters(model)),
        needs=frozenset({"omega", "sigma"}),
        table=flower_table(),
        config_hash="h" * 64,
    )
    sent = []
    for m, own in enumerate(OWN_SCALINGS):
        update = fake_update(model, f"client_{m}", m)
        update.scaling = own
        sent.append(update)
    received = [validate_reply(packed(u), spec, node_id=m) for m, u in enumerate(sent)]
    assert [u.scaling for u in received] == OWN_SCALINGS

    result = make_aggregator("fedavg", lora_merge="factors").aggregate(
        received, scaling=SERVER_SCALING
    )
    n = np.array([u.num_samples for u in sent], dtype=np.float64)
    w = n / n.sum()
    ratios = [(s if s is not None else SERVER_SCALING) / SERVER_SCALING for s in OWN_SCALINGS]
    for layer, delta in result.lora.items():
        b_ref = sum(
            w[m] * ratios[m] * u.lora[f"{layer}.lora_B.weight"].double().numpy()
            for m, u in enumerate(sent)
        )
        a_ref = sum(
            w[m] * u.lora[f"{layer}.lora_A.weight"].double().numpy() for m, u in enumerate(sent)
        )
        assert delta.scaling == SERVER_SCALING
        np.testing.assert_allclose(delta.B.double().numpy(), b_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(delta.A.double().numpy(), a_ref, rtol=1e-5, atol=1e-6)
        assert delta.B.dtype == torch.float32
