"""Fisher-weighted averaging [18] (Matena & Raffel, NeurIPS 2022) of LoRA factors and head.

Per trainable parameter (LoRA A, B and the head), ``theta = sum_m F_m theta_m / sum_m F_m``
with ``F_m`` the diagonal empirical Fisher (mean over local samples of the squared per-sample
gradient of the log-likelihood) plus a floor ``eps`` so parameters no client moved average
uniformly. LoRA is merged as factors. The paper's LoRA set-up of this baseline is not
published; this definition is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from livar_merge.aggregation.common import client_head_biases, unweighted_result
from livar_merge.aggregation.types import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    PreviousHead,
    Scaling,
)
from livar_merge.errors import ClientUpdateError
from livar_merge.lora import LoraDelta, client_factor_lists, lora_layer_names, scaling_for


def fisher_average(
    params: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], *, floor: float = 1e-8
) -> torch.Tensor:
    """Element-wise ``sum_m (F_m + eps) theta_m / sum_m (F_m + eps)``."""
    if len(params) != len(fishers) or not params:
        raise ClientUpdateError("Fisher averaging needs one Fisher per client parameter")
    num = sum((f.double() + floor) * p.double() for p, f in zip(params, fishers, strict=True))
    den = sum(f.double() + floor for f in fishers)
    return (num / den).to(params[0].dtype)  # type: ignore[union-attr]


class FisherAggregator(Aggregator):
    """Fisher-weighted averaging of the LoRA factors and the head."""

    name = "fisher"
    needs = frozenset({"fisher"})

    def __init__(self, *, fisher_floor: float = 1e-8) -> None:
        self.floor = fisher_floor

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "floor": self.floor, "lora_merge": "factors"}

    def merge(
        self, updates: Sequence[ClientUpdate], *, previous_head: PreviousHead, scaling: Scaling
    ) -> AggregationResult:
        ids = [u.client_id for u in updates]
        client_factor_lists([u.lora for u in updates], client_ids=ids)  # consistency checks
        layers = lora_layer_names(updates[0].lora)

        def merged(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            fishers = []
            for u, t in zip(updates, tensors, strict=True):
                f = u.extras["fisher"].get(key)
                if f is None or f.shape != t.shape:
                    raise ClientUpdateError(
                        f"client {u.client_id!r}: Fisher of {key} missing "
                        f"or not of shape {tuple(t.shape)}"
                    )
                fishers.append(f.to(t.device))
            return fisher_average(tensors, fishers, floor=self.floor)

        lora = {}
        for layer in layers:
            a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
            lora[layer] = LoraDelta(
                scaling=scaling_for(scaling, layer),
                B=merged(b_key, [u.lora[b_key] for u in updates]),
                A=merged(a_key, [u.lora[a_key] for u in updates]),
            )
        weight = merged("head.weight", [u.head_weight for u in updates])
        biases = client_head_biases(updates)
        bias = None if biases is None else merged("head.bias", biases)
        return unweighted_result(updates, lora, weight, bias)
