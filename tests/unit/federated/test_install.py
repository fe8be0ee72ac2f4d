"""Installing an aggregation result into the model (livar_merge.federated.install)."""

import numpy as np
import torch

from livar_merge.engines.inprocess import FederatedRun
from livar_merge.federated.install import install_result
from livar_merge.lora import merge_lora
from tests.helpers import tiny


def test_product_merge_folds_eq3_into_the_frozen_weights(tmp_path):
    run = FederatedRun(tiny(), tmp_path)
    gen = torch.Generator().manual_seed(0)
    layers = run.federation.info.lora_layers
    modules = dict(run.model.named_modules())
    states = []
    for _ in range(3):
        state = {}
        for layer in layers:
            base = modules[layer].base_layer.weight
            state[f"{layer}.lora_A.weight"] = torch.randn(4, base.shape[1], generator=gen)
            state[f"{layer}.lora_B.weight"] = torch.randn(base.shape[0], 4, generator=gen)
        states.append(state)
    alpha = np.random.default_rng(0).dirichlet(np.ones(3), size=len(layers)).T
    before = {layer: modules[layer].base_layer.weight.detach().clone() for layer in layers}
    lora = merge_lora(states, alpha, scaling=run.federation.scalings)

    class Result:  # the parts of AggregationResult that install_result() reads
        pass

    result = Result()
    result.lora = lora
    head = run.model.base_model.model.head.modules_to_save["default"]
    result.head = type("H", (), {"weight": head.weight * 0 + 1, "bias": head.bias * 0})()
    install_result(run.model, result, lora_merge="product", seed=run.config.seed, round_index=1)
    for l, layer in enumerate(layers):
        scale = run.federation.scalings[layer]
        expected = before[layer] + scale * sum(
            alpha[m, l] * states[m][f"{layer}.lora_B.weight"] @ states[m][f"{layer}.lora_A.weight"]
            for m in range(3)
        )
        torch.testing.assert_close(modules[layer].base_layer.weight, expected, rtol=1e-5, atol=1e-5)
        assert (modules[layer].lora_B["default"].weight == 0).all()  # LoRA restarted
    assert (head.weight == 1).all()
