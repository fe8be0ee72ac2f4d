"""Fisher-weighted averaging [18] (Matena & Raffel, NeurIPS 2022) of LoRA factors and head.

Per trainable parameter (LoRA A, B and the head), ``theta = sum_m F_m theta_m / sum_m F_m``
with ``F_m`` the diagonal empirical Fisher (mean over local samples of the squared per-sample
gradient of the log-likelihood) plus a floor ``eps`` so parameters no client moved average
uniformly. LoRA is merged as factors, so all clients need one rank per layer (the registry
declares ``mixed_ranks=False``; mixed ranks are refused naming the layer and ranks). A client's
own scaling ``s_m`` (``ClientUpdate.scaling``) is folded into its B before averaging,
``B_m <- c_m B_m`` with ``c_m = s_m / s``, and its Fisher follows the reparameterisation,
``F_B <- F_B / c_m^2``. The paper's LoRA set-up of this baseline is not published; this
definition is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from livar_merge.aggregation.common import client_head_biases, client_scalings, unweighted_result
from livar_merge.aggregation.options import FisherOptions
from livar_merge.aggregation.types import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    MergeContext,
)
from livar_merge.errors import ClientUpdateError
from livar_merge.lora import (
    LoraDelta,
    client_factor_lists,
    client_scaling_ratios,
    lora_layer_names,
    require_common_rank,
    scaling_for,
)
from livar_merge.lora_view import factor_key


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

    def __init__(self, *, fisher_floor: float = FisherOptions.fisher_floor) -> None:
        self.floor = fisher_floor

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "floor": self.floor, "lora_merge": "factors"}

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        """Fisher-weighted factors; ``rank`` is ignored (factors keep the clients' one rank)."""
        scaling = ctx.scaling
        ids = [u.client_id for u in updates]
        lists = client_factor_lists([u.lora for u in updates], client_ids=ids)  # consistency
        require_common_rank(lists, f"method {self.name!r} (elementwise averaging)", client_ids=ids)
        layers = lora_layer_names(updates[0].lora)
        own = client_scalings(updates)
        ratios = None if own is None else client_scaling_ratios(own, scaling, layers, ids)

        def merged(
            key: str, tensors: list[torch.Tensor], factor: list[float] | None = None
        ) -> torch.Tensor:
            fishers = []
            for u, t in zip(updates, tensors, strict=True):
                f = u.extras["fisher"].get(key)
                if f is None or f.shape != t.shape:
                    raise ClientUpdateError(
                        f"client {u.client_id!r}: Fisher of {key} missing "
                        f"or not of shape {tuple(t.shape)}"
                    )
                fishers.append(f.to(t.device))
            if factor is not None:  # fold c_m into theta_m, F_m / c_m^2 (same parameterisation)
                for m, c in enumerate(factor):
                    if c == 0.0:
                        raise ClientUpdateError(
                            f"client {updates[m].client_id!r}: LoRA scaling 0 for {key}"
                        )
                    if c != 1.0:
                        tensors[m], fishers[m] = tensors[m] * c, fishers[m] / (c * c)
            return fisher_average(tensors, fishers, floor=self.floor)

        lora = {}
        for l, layer in enumerate(layers):
            a_key, b_key = factor_key(layer, "A"), factor_key(layer, "B")
            factor = None if ratios is None else [float(c) for c in ratios[:, l]]
            lora[layer] = LoraDelta(
                scaling=scaling_for(scaling, layer),
                B=merged(b_key, [u.lora[b_key] for u in updates], factor),
                A=merged(a_key, [u.lora[a_key] for u in updates]),
            )
        weight = merged("head.weight", [u.head_weight for u in updates])
        biases = client_head_biases(updates)
        bias = None if biases is None else merged("head.bias", biases)
        return unweighted_result(updates, lora, weight, bias)
