"""Server-side aggregation methods behind one registry (used by ``livar-fed`` and Flower).

A method turns the clients' :class:`ClientUpdate` objects into a merged LoRA and head. The four
methods of the paper's ablation (Table 4) are one class with two switches:

=============== ================== ==================
method          LoRA weights       head weights
=============== ================== ==================
``fedavg``      sample counts      sample counts
``livar-alpha`` G_SHAP alpha (Eq5) sample counts
``livar-sigma`` sample counts      feature variance (Eq. 6)
``livar``       G_SHAP alpha       feature variance
=============== ================== ==================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from livar_merge._validation import check_finite_tensor
from livar_merge.coefficients import livar_coefficient_details
from livar_merge.errors import ClientUpdateError
from livar_merge.fedavg import fedavg_weights
from livar_merge.heads import MergedHead, merge_heads, sample_class_weights, variance_class_weights
from livar_merge.lora import LoraDelta, MergeMode, lora_layer_names, merge_lora
from livar_merge.tables import GShapTable


@dataclass
class ClientUpdate:
    """What one client sends after local training.

    Shapes: ``lora`` peft LoRA state (``<layer>.lora_A.weight`` ``[r, k]``, ``lora_B`` ``[d, r]``);
    ``head_weight [C, D]``, ``head_bias [C]``; ``omega_a``/``omega_b`` ``[L]`` in the order of
    ``layer_names``; ``class_sigma``, ``class_present``, ``class_counts`` ``[C]``.
    """

    client_id: str
    num_samples: int
    lora: dict[str, torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    layer_names: tuple[str, ...] = ()
    omega_a: np.ndarray | None = None
    omega_b: np.ndarray | None = None
    class_sigma: np.ndarray | None = None
    class_present: np.ndarray | None = None
    class_counts: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregationResult:
    """Merged LoRA ``{layer: LoraDelta}``, merged head, the LoRA weights ``[clients, layers]``
    used, and method details (bins, cut points, ...) for logging."""

    lora: dict[str, LoraDelta]
    head: MergedHead
    lora_weights: np.ndarray
    layer_names: tuple[str, ...]
    details: dict[str, Any] = field(default_factory=dict)


def validate_updates(
    updates: Sequence[ClientUpdate], *, needs: frozenset[str], num_classes: int | None = None
) -> None:
    """Reject unusable updates with an error naming the client: empty clients, missing
    statistics a method needs, NaN/Inf, wrong shapes. LoRA consistency is checked by the merge."""
    if not updates:
        raise ClientUpdateError("no client updates to aggregate")
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ClientUpdateError(f"duplicate client ids in one round: {ids}")
    ref = updates[0]
    classes = num_classes if num_classes is not None else ref.head_weight.shape[0]
    for u in updates:
        who = f"client {u.client_id!r}"
        if u.num_samples <= 0:
            raise ClientUpdateError(f"{who} trained on {u.num_samples} samples (empty client)")
        check_finite_tensor(u.head_weight, f"{who}: head weight")
        if u.head_weight.shape[0] != classes:
            raise ClientUpdateError(
                f"{who}: head has {u.head_weight.shape[0]} classes, expected {classes}"
            )
        if "omega" in needs:
            if u.omega_a is None or u.omega_b is None:
                raise ClientUpdateError(f"{who} sent no omega_A/omega_B (needed by this method)")
            if tuple(u.layer_names) != tuple(ref.layer_names):
                raise ClientUpdateError(f"{who}: omega layer names differ from the first client's")
            for name, omega in (("omega_A", u.omega_a), ("omega_B", u.omega_b)):
                if np.shape(omega) != (len(ref.layer_names),):
                    raise ClientUpdateError(
                        f"{who}: {name} has shape {np.shape(omega)}, expected "
                        f"({len(ref.layer_names)},)"
                    )
        if "sigma" in needs:
            for name in ("class_sigma", "class_present", "class_counts"):
                value = getattr(u, name)
                if value is None or np.shape(value) != (classes,):
                    raise ClientUpdateError(
                        f"{who}: {name} missing or not of shape ({classes},) (the method needs it)"
                    )


class Aggregator:
    """Base of aggregation methods: ``aggregate(updates, previous_head=..., scaling=...)``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        *,
        previous_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        scaling: float | Mapping[str, float] = 1.0,
    ) -> AggregationResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_method(name: str) -> Callable[[Callable[..., Aggregator]], Callable[..., Aggregator]]:
    """Register a factory ``(**options) -> Aggregator`` under ``name``."""

    def decorator(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        if name in _REGISTRY:
            raise ValueError(f"aggregation method {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the registered method ``name`` with ``options`` (table, lora_merge, ...)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregation method {name!r}; available: {available_methods()}")
    return _REGISTRY[name](**options)


class WeightedAggregator(Aggregator):
    """LoRA weighted by G_SHAP alpha or sample counts; head by feature variance or counts."""

    def __init__(
        self,
        *,
        lora_weighting: str,
        head_weighting: str,
        table: GShapTable | str = "paper-table-a",
        lora_merge: MergeMode = "product",
        name: str = "",
    ) -> None:
        if lora_weighting not in ("livar", "samples") or head_weighting not in (
            "variance",
            "samples",
        ):
            raise ValueError(f"bad weighting {lora_weighting!r}/{head_weighting!r}")
        self.lora_weighting = lora_weighting
        self.head_weighting = head_weighting
        self.table = GShapTable.load(table) if isinstance(table, str) else table
        self.lora_merge = lora_merge
        self.name = name  # type: ignore[misc]
        needs = set()
        if lora_weighting == "livar":
            needs.add("omega")
        if head_weighting == "variance":
            needs.add("sigma")
        self.needs = frozenset(needs)  # type: ignore[misc]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "method": self.name,
            "lora_weighting": self.lora_weighting,
            "head_weighting": self.head_weighting,
            "lora_merge": self.lora_merge,
        }
        if self.lora_weighting == "livar":
            info["table"] = self.table.identity()
        return info

    def lora_weights(
        self, updates: Sequence[ClientUpdate], layers: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``[clients, layers]`` LoRA merge weights and details."""
        if self.lora_weighting == "samples":
            w = fedavg_weights([u.num_samples for u in updates])
            return np.repeat(w[:, None], len(layers), axis=1), {}
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
        if self.head_weighting == "samples":
            return sample_class_weights([u.num_samples for u in updates], num_classes)
        sigma = np.stack([np.asarray(u.class_sigma, dtype=np.float64) for u in updates])
        present = np.stack([np.asarray(u.class_present, dtype=bool) for u in updates])
        return variance_class_weights(sigma, present, client_ids=[u.client_id for u in updates])

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        *,
        previous_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        scaling: float | Mapping[str, float] = 1.0,
    ) -> AggregationResult:
        validate_updates(updates, needs=self.needs)
        ids = [u.client_id for u in updates]
        layers = lora_layer_names(updates[0].lora)
        weights, details = self.lora_weights(updates, layers)
        lora = merge_lora(
            [u.lora for u in updates],
            weights,
            mode=self.lora_merge,
            scaling=scaling,
            layer_names=layers,
            client_ids=ids,
        )
        num_classes = updates[0].head_weight.shape[0]
        prev_w, prev_b = previous_head if previous_head is not None else (None, None)
        head = merge_heads(
            [u.head_weight for u in updates],
            None if updates[0].head_bias is None else [u.head_bias for u in updates],
            self.head_weights(updates, num_classes),
            previous_weight=prev_w,
            previous_bias=prev_b,
            client_ids=ids,
        )
        return AggregationResult(lora, head, weights, tuple(layers), details)


def _weighted(lora_weighting: str, head_weighting: str, name: str) -> Callable[..., Aggregator]:
    def factory(**options: Any) -> Aggregator:
        return WeightedAggregator(
            lora_weighting=lora_weighting, head_weighting=head_weighting, name=name, **options
        )

    factory.__doc__ = f"{name}: LoRA weighted by {lora_weighting}, head by {head_weighting}."
    return factory


for _name, _lora, _head in (
    ("fedavg", "samples", "samples"),
    ("livar", "livar", "variance"),
    ("livar-alpha", "livar", "samples"),
    ("livar-sigma", "samples", "variance"),
):
    register_method(_name)(_weighted(_lora, _head, _name))
