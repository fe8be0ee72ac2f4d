"""What clients send and the server returns, the checks on it, and the methods' base class."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from livar_merge._validation import check_finite_tensor
from livar_merge.aggregation.needs import NEEDS
from livar_merge.errors import ClientUpdateError
from livar_merge.heads import MergedHead
from livar_merge.lora import LoraDelta

# The global head before a round, ``(weight [C, D], bias [C] or None)``, and the LoRA scaling
# alpha / r (one value, or one per layer).
PreviousHead = tuple[torch.Tensor, torch.Tensor | None] | None
Scaling = float | Mapping[str, float]


@dataclass(frozen=True)
class MergeContext:
    """What a merge needs from the server besides the updates.

    ``previous_head``: the global head before the round (weight ``[C, D]``, bias ``[C]`` or
    None), kept for classes no client saw (Eq. 6); ``scaling``: the server's LoRA scaling
    (``lora_alpha / r``, one number or one per layer), which a client's own
    ``ClientUpdate.scaling`` overrides for it; ``rank``: the server's LoRA rank, the target of
    ``svd`` merges (None: the clients' common rank).
    """

    previous_head: PreviousHead = None
    scaling: Scaling = 1.0
    rank: int | None = None


@dataclass
class UpdateOrigin:
    """Where an update came from: transport metadata, never a statistic (filled by the Flower
    engine: the node's partition, node id, the bytes of the message it trained on, and the
    option hash and G_SHAP table identity its reply named)."""

    partition_id: int | None = None
    node_id: int | None = None
    download_bytes: int | None = None
    config_hash: str | None = None
    table: dict[str, Any] | None = None


@dataclass
class ClientUpdate:
    """What one client sends after local training.

    Shapes: ``lora`` peft LoRA state (``<layer>.lora_A.weight`` ``[r, k]``, ``lora_B`` ``[d, r]``;
    the rank ``r`` may differ from other clients' for methods whose spec has ``mixed_ranks``);
    ``head_weight [C, D]``, ``head_bias [C]``; ``omega_a``/``omega_b`` ``[L]`` in the order of
    ``layer_names``; ``class_sigma``, ``class_present``, ``class_counts`` ``[C]``.

    ``scaling``: this client's own peft LoRA scaling (``lora_alpha / r``; one number or
    ``{layer: scaling}``), or None (default) when it is the server's. When set, it overrides
    the ``scaling`` given to :meth:`Aggregator.aggregate` for this client: the merge folds it
    into the client's factors, ``B <- (scaling / server scaling) B``, and the merged
    ``LoraDelta`` keeps the server's scaling (see :mod:`livar_merge.lora`).

    ``extras`` holds the baselines' statistics only (fields of
    :mod:`livar_merge.aggregation.needs`: Grams, Fisher, prototypes); ``report``: the client's
    training report (``train_loss``, ``train_seconds``, ...; ``clients.csv``); ``origin``:
    transport metadata (:class:`UpdateOrigin`).
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
    scaling: float | Mapping[str, float] | None = None
    report: dict[str, float | int] = field(default_factory=dict)
    origin: UpdateOrigin = field(default_factory=UpdateOrigin)

    def nbytes(self, *, extras_only: bool = False) -> int:
        """Bytes of the tensors and arrays this update carries (what a client uploads), or of
        the method's extra statistics alone (Grams, Fisher, prototypes, moments)."""
        if extras_only:
            return payload_nbytes(self.extras)
        fields: tuple[Any, ...] = (
            self.lora,
            self.head_weight,
            self.head_bias,
            self.omega_a,
            self.omega_b,
        )
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


#: ``AggregationResult.details`` key of ``{layer: fraction}``, set by ``svd`` merges: the fraction
#: of each layer's exact merged delta's squared Frobenius norm (Eq. 3's product; RegMean's dense
#: solution) that the truncation to the target rank dropped, ``sum_{i>r} S_i^2 / sum_i S_i^2``.
SVD_ENERGY_KEY = "svd_discarded_energy"


@dataclass
class AggregationResult:
    """Merged LoRA ``{layer: LoraDelta}``, merged head, the LoRA weights ``[clients, layers]``
    used, and method details (bins, cut points, ``svd_discarded_energy``, ...) for logging."""

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
            _check_omegas(u, ref.layer_names)
        for need in sorted(needs & NEEDS.keys()):
            for stat in NEEDS[need].fields:
                if stat.extra not in u.extras:
                    raise ClientUpdateError(
                        f"{who} sent no {stat.extra!r} (the method needs {need})"
                    )
                _check_finite_tree(u.extras[stat.extra], f"{who}: {stat.extra}", stat.nan_rows)
        if "sigma" in needs:
            for name in ("class_sigma", "class_present", "class_counts"):
                value = getattr(u, name)
                if value is None or np.shape(value) != (classes,):
                    raise ClientUpdateError(
                        f"{who}: {name} missing or not of shape ({classes},) (the method needs it)"
                    )


def _check_omegas(update: ClientUpdate, layer_names: tuple[str, ...]) -> None:
    """omega_A and omega_B present, ``[L]`` in the first client's layer order."""
    who = f"client {update.client_id!r}"
    if update.omega_a is None or update.omega_b is None:
        raise ClientUpdateError(f"{who} sent no omega_A/omega_B (needed by this method)")
    if tuple(update.layer_names) != tuple(layer_names):
        raise ClientUpdateError(f"{who}: omega layer names differ from the first client's")
    for name, omega in (("omega_A", update.omega_a), ("omega_B", update.omega_b)):
        if np.shape(omega) != (len(layer_names),):
            raise ClientUpdateError(
                f"{who}: {name} has shape {np.shape(omega)}, expected ({len(layer_names)},)"
            )


def _check_finite_tree(value: Any, where: str, nan_rows: bool = False) -> None:
    """NaN/Inf check of a tensor, array or dict of them (not of a field whose rows may be NaN:
    classes a client never saw have NaN prototypes by design)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite_tree(item, f"{where}[{key!r}]", nan_rows)
    elif isinstance(value, torch.Tensor):
        check_finite_tensor(value, where)
    elif nan_rows:
        return
    elif not np.isfinite(np.asarray(value, dtype=np.float64)).all():
        raise ClientUpdateError(f"{where} holds NaN/Inf values")


class ClientQuery(Protocol):
    """What an engine lets a method ask of a round's clients after the merge was installed
    (each engine implements it once: in process, or a Flower QUERY round trip)."""

    def moments(
        self, updates: Sequence[ClientUpdate], *, full_covariance: bool
    ) -> list[dict[str, np.ndarray]]:
        """Class feature moments of the clients of ``updates`` (in that order) under the
        installed global model: ``mean [C, D]``, ``cov [C, D, D]`` (``[C, D]`` when not
        ``full_covariance``), ``count [C]``."""
        ...


@dataclass(frozen=True)
class InstallContext:
    """What :meth:`Aggregator.after_install` gets besides the model and the updates.

    ``round_index``; ``final_round``: whether it is the run's last round; ``head``: the global
    model's classification head (``Linear``, weight ``[C, D]``), modified in place by methods
    that re-train it; ``seed_for(purpose)``: this round's seed for a purpose (stable across
    runs and engines); ``clients``: the engine's :class:`ClientQuery` (None where the caller
    offers none).
    """

    round_index: int
    final_round: bool
    head: torch.nn.Linear
    seed_for: Callable[[str], int]
    clients: ClientQuery | None = None


class Aggregator:
    """Base of aggregation methods: :meth:`aggregate` checks the updates against
    :attr:`needs`, then :meth:`merge` combines them. Subclasses implement :meth:`merge` (or
    override :meth:`aggregate` whole).

    A method that keeps server state or talks to clients beyond one update overrides the
    lifecycle hooks, so the runtime never special-cases it: :meth:`state` / :meth:`load_state`
    (checkpointed with the global model), :meth:`broadcast` (tensors sent to clients with the
    next round's training instruction) and :meth:`after_install` (a step after the merge was
    installed into the global model, which may query the clients).
    """

    name: str = ""  # the registry name (a family's instances set their own)
    needs: frozenset[str] = frozenset()  # client statistics (livar_merge.aggregation.needs)

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        *,
        previous_head: PreviousHead = None,
        scaling: Scaling = 1.0,
        rank: int | None = None,
    ) -> AggregationResult:
        """The merged LoRA and head of ``updates`` (:func:`validate_updates` first).

        ``scaling``: the server's LoRA scaling (clients' own ``ClientUpdate.scaling`` override
        it for them); ``rank``: the server's LoRA rank, the target of ``svd`` merges (default:
        the clients' common rank; required when their ranks differ). They reach :meth:`merge`
        as one :class:`MergeContext`.
        """
        validate_updates(updates, needs=self.needs)
        return self.merge(updates, MergeContext(previous_head, scaling, rank))

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        """Combine validated ``updates`` in the round's :class:`MergeContext`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}

    # ------------------------------------------------------------------ lifecycle hooks
    def state(self) -> dict[str, torch.Tensor]:
        """Server state this method keeps across rounds (``{name: tensor}``; default none)."""
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state` (a resumed run)."""

    def broadcast(self) -> dict[str, torch.Tensor]:
        """Tensors the clients receive with the next round's training instruction (default
        none); the client loop reads them by name."""
        return {}

    def after_install(self, updates: Sequence[ClientUpdate], ctx: InstallContext) -> None:
        """A step after this round's merge was installed into the global model (default
        none)."""
