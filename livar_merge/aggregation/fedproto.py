"""FedProto [26] (Tan et al., AAAI 2022): FedAvg plus global class prototypes.

Local loss ``CE + lambda * ||f(x) - P_y||^2`` with the global class prototypes ``P`` (the
count-weighted means of the clients' class-mean features, :func:`pooled_prototypes`), which the
server sends back with the next round; LoRA and head by FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from livar_merge.aggregation.options import FedProtoOptions
from livar_merge.aggregation.types import AggregationResult, ClientUpdate, MergeContext
from livar_merge.aggregation.weighted import WeightedAggregator
from livar_merge.lora import MergeMode


def pooled_prototypes(
    means: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Global prototypes ``[C, D]`` (count-weighted class means; NaN rows for unseen classes)
    and the pooled counts ``[C]``."""
    n = np.stack([np.asarray(c, dtype=np.float64) for c in counts])  # [M, C]
    mu = np.stack([np.nan_to_num(np.asarray(m, dtype=np.float64)) for m in means])  # [M, C, D]
    total = n.sum(0)
    proto = np.einsum("mc,mcd->cd", n, mu)
    with np.errstate(invalid="ignore", divide="ignore"):
        proto = proto / total[:, None]
    proto[total == 0] = np.nan
    return proto, total


class FedProtoAggregator(WeightedAggregator):
    """FedAvg of LoRA and head plus the pooled class prototypes sent back to clients
    (``details["prototypes"]`` ``[C, D]``, ``details["prototype_counts"]`` ``[C]``).

    The last round's prototypes are this method's server state (:meth:`state`, checkpointed)
    and what it broadcasts to clients (``{"prototypes": [C, D]}``, float32; NaN rows for
    classes no client saw), whose loss then adds ``proto_weight * ||f(x) - P_y||^2``.
    """

    def __init__(
        self,
        *,
        lora_merge: MergeMode = "product",
        proto_weight: float = FedProtoOptions.proto_weight,
    ) -> None:
        super().__init__("fedproto", "samples", "samples", lora_merge=lora_merge)
        self.needs = frozenset({"prototypes"})
        self.proto_weight = proto_weight
        self.prototypes: torch.Tensor | None = None  # [C, D] of the last merge

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "proto_weight": self.proto_weight}

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        result = super().merge(updates, ctx)
        proto, counts = pooled_prototypes(
            [u.extras["proto_mean"] for u in updates], [u.extras["proto_count"] for u in updates]
        )
        result.details["prototypes"] = proto
        result.details["prototype_counts"] = counts
        self.prototypes = torch.as_tensor(proto, dtype=torch.float32)
        return result

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.prototypes is None else {"prototypes": self.prototypes.contiguous()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "prototypes" in tensors:
            self.prototypes = tensors["prototypes"].to(torch.float32).cpu()

    def broadcast(self) -> dict[str, torch.Tensor]:
        return self.state()
