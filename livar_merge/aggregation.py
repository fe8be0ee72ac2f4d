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

    def nbytes(self, *, extras_only: bool = False) -> int:
        """Bytes of the tensors and arrays this update carries (what a client uploads), or of
        the method's extra statistics alone (Grams, Fisher, prototypes, moments)."""
        if extras_only:
            return payload_nbytes(self.extras)
        fields = (self.lora, self.head_weight, self.head_bias, self.omega_a, self.omega_b)
        fields += (self.class_sigma, self.class_present, self.class_counts, self.extras)
        return sum(payload_nbytes(f) for f in fields)


def payload_nbytes(value: Any) -> int:
    """Total ``nbytes`` of the tensors and arrays in ``value`` (nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(payload_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(payload_nbytes(v) for v in value)
    return 0


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
        for need, keys in EXTRA_KEYS.items():
            if need in needs:
                for key in keys:
                    if key not in u.extras:
                        raise ClientUpdateError(f"{who} sent no {key!r} (the method needs {need})")
                    _check_finite_tree(u.extras[key], f"{who}: {key}")
        if "sigma" in needs:
            for name in ("class_sigma", "class_present", "class_counts"):
                value = getattr(u, name)
                if value is None or np.shape(value) != (classes,):
                    raise ClientUpdateError(
                        f"{who}: {name} missing or not of shape ({classes},) (the method needs it)"
                    )


EXTRA_KEYS = {
    "gram": ("gram", "head_gram"),
    "fisher": ("fisher",),
    "prototypes": ("proto_mean", "proto_count"),
}


def _check_finite_tree(value: Any, where: str) -> None:
    """NaN/Inf check of a tensor, array or dict of them (NaN allowed in prototype rows)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite_tree(item, f"{where}[{key!r}]")
    elif isinstance(value, torch.Tensor):
        check_finite_tensor(value, where)
    elif where.endswith("proto_mean"):
        return  # classes a client never saw are NaN by design
    elif not np.isfinite(np.asarray(value, dtype=np.float64)).all():
        raise ClientUpdateError(f"{where} holds NaN/Inf values")


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
    """Build the registered method ``name``; ``options`` it does not take are ignored, so a run
    can pass all its method options (table, lora_merge, regmean_shrinkage, ...) to any method."""
    import inspect

    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregation method {name!r}; available: {available_methods()}")
    factory = _REGISTRY[name]
    accepted = inspect.signature(getattr(factory, "accepts", factory)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        options = {k: v for k, v in options.items() if k in accepted}
    return factory(**options)


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
    factory.accepts = _weighted_options  # type: ignore[attr-defined]
    return factory


def _weighted_options(
    table: GShapTable | str = "paper-table-a", lora_merge: MergeMode = "product"
) -> None:
    """The options of the weighted methods (for make_aggregator's filtering)."""


for _name, _lora, _head in (
    ("fedavg", "samples", "samples"),
    ("livar", "livar", "variance"),
    ("livar-alpha", "livar", "samples"),
    ("livar-sigma", "samples", "variance"),
):
    register_method(_name)(_weighted(_lora, _head, _name))


# --------------------------------------------------------------------------- baselines
def _no_class_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    return np.full((len(updates), updates[0].head_weight.shape[0]), np.nan)


def _refactorise(dense: torch.Tensor, scaling: float, rank: int) -> LoraDelta:
    """Rank-``rank`` factors of ``dense / scaling`` by truncated SVD (balanced)."""
    u, s, vh = torch.linalg.svd(dense.double() / scaling, full_matrices=False)
    root = s[:rank].sqrt()
    return LoraDelta(
        scaling=scaling, B=(u[:, :rank] * root).float(), A=(root[:, None] * vh[:rank]).float()
    )


class RegMeanAggregator(Aggregator):
    """RegMean on the dense LoRA deltas and the head (see :mod:`livar_merge.baselines`)."""

    name = "regmean"
    needs = frozenset({"gram"})

    def __init__(self, *, lora_merge: MergeMode = "product", regmean_shrinkage: float = 0.5):
        if lora_merge == "factors":
            raise ValueError("regmean merges dense deltas: use lora_merge 'product' or 'svd'")
        self.lora_merge = lora_merge
        self.shrinkage = regmean_shrinkage

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "lora_merge": self.lora_merge, "shrinkage": self.shrinkage}

    def aggregate(self, updates, *, previous_head=None, scaling=1.0):
        from livar_merge.baselines import regmean_delta, regmean_head
        from livar_merge.lora import client_factor_lists, scaling_for

        validate_updates(updates, needs=self.needs)
        ids = [u.client_id for u in updates]
        lists = client_factor_lists([u.lora for u in updates], client_ids=ids)
        lora: dict[str, LoraDelta] = {}
        for layer, (factors_b, factors_a) in lists.items():
            grams = [u.extras["gram"].get(layer) for u in updates]
            k = factors_a[0].shape[1]
            for u, g in zip(updates, grams, strict=True):
                if g is None or tuple(g.shape) != (k, k):
                    raise ClientUpdateError(
                        f"client {u.client_id!r}: Gram of layer {layer} missing or not [{k}, {k}]"
                    )
            s = scaling_for(scaling, layer)
            dense = regmean_delta(factors_b, factors_a, grams, scaling=s, shrinkage=self.shrinkage)
            lora[layer] = (
                _refactorise(dense, s, factors_b[0].shape[1])
                if self.lora_merge == "svd"
                else LoraDelta(scaling=s, dense=dense.float())
            )
        if updates[0].head_bias is None:
            raise ClientUpdateError("regmean's head merge expects a head with a bias")
        weight, bias = regmean_head(
            [u.head_weight for u in updates],
            [u.head_bias for u in updates],
            [u.extras["head_gram"] for u in updates],
            shrinkage=self.shrinkage,
        )
        dtype = updates[0].head_weight.dtype
        head = MergedHead(weight.to(dtype), bias.to(dtype), _no_class_weights(updates), ())
        weights = np.full((len(updates), len(lora)), np.nan)
        return AggregationResult(lora, head, weights, tuple(lora), {})


class FisherAggregator(Aggregator):
    """Fisher-weighted averaging of LoRA factors and head (see :mod:`livar_merge.baselines`)."""

    name = "fisher"
    needs = frozenset({"fisher"})

    def __init__(self, *, fisher_floor: float = 1e-8) -> None:
        self.floor = fisher_floor

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "floor": self.floor, "lora_merge": "factors"}

    def aggregate(self, updates, *, previous_head=None, scaling=1.0):
        from livar_merge.baselines import fisher_average
        from livar_merge.lora import client_factor_lists, scaling_for

        validate_updates(updates, needs=self.needs)
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
        bias = (
            None
            if updates[0].head_bias is None
            else merged("head.bias", [u.head_bias for u in updates])
        )
        head = MergedHead(weight, bias, _no_class_weights(updates), ())
        return AggregationResult(
            lora, head, np.full((len(updates), len(layers)), np.nan), tuple(layers), {}
        )


class FedProtoAggregator(WeightedAggregator):
    """FedAvg of LoRA and head plus the pooled class prototypes sent back to clients."""

    def __init__(self, *, lora_merge: MergeMode = "product", proto_weight: float = 1.0) -> None:
        super().__init__(
            lora_weighting="samples",
            head_weighting="samples",
            lora_merge=lora_merge,
            name="fedproto",
        )
        self.needs = frozenset({"prototypes"})  # type: ignore[misc]
        self.proto_weight = proto_weight

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "proto_weight": self.proto_weight}

    def aggregate(self, updates, *, previous_head=None, scaling=1.0):
        from livar_merge.baselines import pooled_prototypes

        result = super().aggregate(updates, previous_head=previous_head, scaling=scaling)
        proto, counts = pooled_prototypes(
            [u.extras["proto_mean"] for u in updates], [u.extras["proto_count"] for u in updates]
        )
        result.details["prototypes"] = proto
        result.details["prototype_counts"] = counts
        return result


class CCVRAggregator(Aggregator):
    """A base method followed by CCVR's head calibration on virtual features.

    ``needs`` includes ``"moments"``: after aggregation the runtime asks every client for its
    per-class feature moments under the new global model and calls :meth:`refine_head`.
    """

    def __init__(
        self,
        base: Aggregator,
        *,
        ccvr_samples: int = 256,
        ccvr_epochs: int = 5,
        ccvr_lr: float = 0.01,
        ccvr_temperature: float = 0.1,
        ccvr_covariance: str = "full",
        name: str = "ccvr",
    ) -> None:
        if ccvr_covariance not in ("full", "diag"):
            raise ValueError(f"ccvr_covariance must be 'full' or 'diag', got {ccvr_covariance!r}")
        self.base = base
        self.name = name  # type: ignore[misc]
        self.needs = base.needs | {"moments"}  # type: ignore[misc]
        self.options = {
            "samples_per_class": ccvr_samples,
            "epochs": ccvr_epochs,
            "lr": ccvr_lr,
            "temperature": ccvr_temperature,
        }
        self.full_covariance = ccvr_covariance == "full"

    def describe(self) -> dict[str, Any]:
        return {
            **self.base.describe(),
            "method": self.name,
            "ccvr": self.options,
            "ccvr_covariance": "full" if self.full_covariance else "diag",
        }

    def aggregate(self, updates, *, previous_head=None, scaling=1.0):
        return self.base.aggregate(updates, previous_head=previous_head, scaling=scaling)

    def calibrate(
        self, head: torch.nn.Linear, moments: Sequence[Mapping[str, np.ndarray]], *, seed: int
    ) -> None:
        """:meth:`refine_head` on a model's head module, in place."""
        weight, bias = self.refine_head(
            head.weight.detach(),
            None if head.bias is None else head.bias.detach(),
            moments,
            seed=seed,
        )
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)

    def refine_head(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        moments: Sequence[Mapping[str, np.ndarray]],
        *,
        seed: int,
    ):
        """CCVR: pool the clients' moments, sample virtual features, re-train the head."""
        from livar_merge.baselines import pool_moments, retrain_head, sample_virtual_features

        pooled = pool_moments(
            [m["mean"] for m in moments], [m["cov"] for m in moments], [m["count"] for m in moments]
        )
        feats, labels = sample_virtual_features(
            pooled, self.options["samples_per_class"], seed=seed
        )
        return retrain_head(
            weight,
            bias,
            feats.to(weight.device),
            labels.to(weight.device),
            epochs=self.options["epochs"],
            lr=self.options["lr"],
            temperature=self.options["temperature"],
            seed=seed,
        )


def _ccvr_options(
    ccvr_samples: int = 256,
    ccvr_epochs: int = 5,
    ccvr_lr: float = 0.01,
    ccvr_temperature: float = 0.1,
    ccvr_covariance: str = "full",
    table: GShapTable | str = "paper-table-a",
    lora_merge: MergeMode = "product",
) -> None:
    """The options of the CCVR methods (for make_aggregator's filtering)."""


def _ccvr(base_method: str, name: str) -> Callable[..., Aggregator]:
    def factory(
        *, table: GShapTable | str = "paper-table-a", lora_merge: MergeMode = "product", **ccvr: Any
    ) -> Aggregator:
        base = make_aggregator(base_method, table=table, lora_merge=lora_merge)
        return CCVRAggregator(base, name=name, **ccvr)

    factory.accepts = _ccvr_options  # type: ignore[attr-defined]
    return factory


register_method("regmean")(RegMeanAggregator)
register_method("fisher")(FisherAggregator)
register_method("fedproto")(FedProtoAggregator)
register_method("ccvr")(_ccvr("fedavg", "ccvr"))
register_method("livar+ccvr")(_ccvr("livar", "livar+ccvr"))
