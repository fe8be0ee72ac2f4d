"""The paper's ablation (Table 4): one weighted merge with two switches.

=============== ================== ========================
method          LoRA weights       head weights
=============== ================== ========================
``fedavg``      sample counts      sample counts
``livar-alpha`` G_SHAP alpha (Eq5) sample counts
``livar-sigma`` sample counts      feature variance (Eq. 6)
``livar``       G_SHAP alpha       feature variance
=============== ================== ========================

LoRA: ``dW_l = sum_m w_ml s_m B_ml A_ml`` (Eq. 3, :func:`~livar_merge.lora.merge_lora`) with
``w_ml`` the alpha of :func:`~livar_merge.coefficients.livar_coefficient_details` or
``n_m / sum n``; head row ``c``: ``sum_m v_mc W_mc`` (:func:`~livar_merge.heads.merge_heads`).
``s_m`` is the server's scaling unless the client sent its own (``ClientUpdate.scaling``);
clients' ranks may differ with ``lora_merge`` ``product`` or ``svd`` (alpha is one number per
client and layer, whatever the rank). ``AggregationResult.lora_weights`` is ``w``, without the
scaling ratios folded in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from livar_merge.aggregation.common import client_head_biases, client_scalings, svd_details
from livar_merge.aggregation.types import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    MergeContext,
)
from livar_merge.coefficients import livar_coefficient_details
from livar_merge.errors import ClientUpdateError, MethodOptionError
from livar_merge.fedavg import fedavg_weights
from livar_merge.heads import merge_heads, sample_class_weights, variance_class_weights
from livar_merge.lora import MergeMode, lora_layer_names, merge_lora
from livar_merge.tables import GShapTable

TableLike = GShapTable | str
LoraWeighting = Literal["livar", "samples"]
HeadWeighting = Literal["variance", "samples"]


class WeightedAggregator(Aggregator):
    """LoRA weighted by G_SHAP alpha or sample counts; head by feature variance or counts.

    ``table`` (a :class:`GShapTable` or a name) is needed, and loaded, only for
    ``lora_weighting="livar"`` (:attr:`table`, None otherwise).
    """

    def __init__(
        self,
        name: str,
        lora_weighting: LoraWeighting,
        head_weighting: HeadWeighting,
        *,
        table: TableLike | None = None,
        lora_merge: MergeMode = "product",
    ) -> None:
        if lora_weighting not in ("livar", "samples") or head_weighting not in (
            "variance",
            "samples",
        ):
            raise MethodOptionError(f"bad weighting {lora_weighting!r}/{head_weighting!r}")
        if lora_weighting == "livar" and table is None:
            raise MethodOptionError(f"method {name!r} weights LoRA by G_SHAP: it needs a table")
        self.lora_weighting = lora_weighting
        self.head_weighting = head_weighting
        self.table: GShapTable | None = None  # the samples weightings read no table
        if lora_weighting == "livar":
            self.table = GShapTable.load(table) if isinstance(table, str) else table
        self.lora_merge = lora_merge
        self.name = name
        needs = set()
        if lora_weighting == "livar":
            needs.add("omega")
        if head_weighting == "variance":
            needs.add("sigma")
        self.needs = frozenset(needs)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "method": self.name,
            "lora_weighting": self.lora_weighting,
            "head_weighting": self.head_weighting,
            "lora_merge": self.lora_merge,
        }
        if self.table is not None:
            info["table"] = self.table.identity()
        return info

    def lora_weights(
        self, updates: Sequence[ClientUpdate], layers: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``[clients, layers]`` LoRA merge weights and details."""
        if self.lora_weighting == "samples":
            w = fedavg_weights([u.num_samples for u in updates])
            return np.repeat(w[:, None], len(layers), axis=1), {}
        assert self.table is not None  # loaded for the livar weighting
        ids = [u.client_id for u in updates]
        omega_layers = list(updates[0].layer_names)
        if sorted(omega_layers) != sorted(layers):
            raise ClientUpdateError("omega layer names do not match the LoRA layers of the update")
        order = [omega_layers.index(layer) for layer in layers]
        omega_a = np.stack([np.asarray(u.omega_a, dtype=np.float64)[order] for u in updates])
        omega_b = np.stack([np.asarray(u.omega_b, dtype=np.float64)[order] for u in updates])
        details = livar_coefficient_details(
            omega_a, omega_b, self.table, client_ids=ids, layer_names=list(layers)
        )
        return details.alpha, {
            "omega_a": omega_a,
            "omega_b": omega_b,
            "bin_a": details.bin_a,
            "bin_b": details.bin_b,
            "cuts_a": details.cuts_a,
            "cuts_b": details.cuts_b,
        }

    def head_weights(self, updates: Sequence[ClientUpdate], num_classes: int) -> np.ndarray:
        """``[clients, classes]`` head merge weights."""
        if self.head_weighting == "samples":
            return sample_class_weights([u.num_samples for u in updates], num_classes)
        sigma = np.stack([np.asarray(u.class_sigma, dtype=np.float64) for u in updates])
        present = np.stack([np.asarray(u.class_present, dtype=bool) for u in updates])
        return variance_class_weights(sigma, present, client_ids=[u.client_id for u in updates])

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        """Weighted merge; clients may differ in rank (``product``, ``svd`` with ``rank``) and
        in scaling (``ClientUpdate.scaling``). ``svd`` adds ``details["svd_discarded_energy"]``
        ``{layer: fraction}``."""
        previous_head, scaling, rank = ctx.previous_head, ctx.scaling, ctx.rank
        ids = [u.client_id for u in updates]
        layers = lora_layer_names(updates[0].lora)
        weights, details = self.lora_weights(updates, layers)
        lora = merge_lora(
            [u.lora for u in updates],
            weights,
            mode=self.lora_merge,
            scaling=scaling,
            rank=rank,
            layer_names=layers,
            client_ids=ids,
            client_scalings=client_scalings(updates),
        )
        details.update(svd_details(lora))
        num_classes = updates[0].head_weight.shape[0]
        prev_w, prev_b = previous_head if previous_head is not None else (None, None)
        head = merge_heads(
            [u.head_weight for u in updates],
            client_head_biases(updates),
            self.head_weights(updates, num_classes),
            previous_weight=prev_w,
            previous_bias=prev_b,
            client_ids=ids,
        )
        return AggregationResult(lora, head, weights, tuple(layers), details)


def _weighted(
    name: str, lora_weighting: LoraWeighting, head_weighting: HeadWeighting
) -> Callable[..., WeightedAggregator]:
    def factory(
        *, table: TableLike = "paper-table-a", lora_merge: MergeMode = "product"
    ) -> WeightedAggregator:
        return WeightedAggregator(
            name, lora_weighting, head_weighting, table=table, lora_merge=lora_merge
        )

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"{name}: LoRA weighted by {lora_weighting}, head by {head_weighting}."
    return factory


# The registered factories (registry.BUILTIN_METHODS); their defaults are FedConfig's. All four
# take a table (the ablation's shared options); those weighting LoRA by samples ignore it.
fedavg = _weighted("fedavg", "samples", "samples")
livar = _weighted("livar", "livar", "variance")
livar_alpha = _weighted("livar-alpha", "livar", "samples")
livar_sigma = _weighted("livar-sigma", "samples", "variance")
