"""One collector per client statistic: the lifecycle hooks of local training.

:func:`~livar_merge.federated.client.train_client` is a short loop that drives the collectors a
round needs (:func:`build_collectors`, from the run's ``needs`` and what the method broadcast),
in the style of FL4Health's client hooks. Each collector owns one concern:

==================  ==========================================================================
collector           what it does, and when
==================  ==========================================================================
OmegaCollector      omega_A, omega_B (Eq. 4): an optimizer hook during training
                    (:class:`~livar_merge.signals.ImportanceTracker`), the cumulative totals
                    of the released code in the client's memory
SigmaCollector      sigma^(c) (Eq. 6): the last local epoch's batches, or a pass after training
                    (on the trained model, or on the pretrained backbone W0)
FeaturePass         RegMean's input Grams and FedProto's class-mean features: one inference
                    pass after training for both
FisherCollector     the diagonal empirical Fisher after training
PrototypeTerm       FedProto's loss term ``lambda ||f(x) - P_y||^2`` with the broadcast
                    global prototypes (changes training; contributes nothing)
==================  ==========================================================================

Hooks, in order: :meth:`Collector.attach` (model, optimizer) before training,
:meth:`Collector.loss` (a term added to the batch loss), :meth:`Collector.on_batch` after each
optimizer step, :meth:`Collector.after_training` (passes over the local data) and
:meth:`Collector.contribute` (write the statistic into the :class:`ClientUpdate`). Collectors
run in the order of :func:`build_collectors`, which fixes the order of the passes after training
(sigma, Grams/prototypes, Fisher) and so every random draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livar_merge.aggregation import ClientUpdate
from livar_merge.federated.data import BatchSource
from livar_merge.federated.model import autocast_context, forward_with_features, peft_view
from livar_merge.federated.statistics import diagonal_fisher, gram_and_prototype_pass
from livar_merge.lora_view import find_lora_parameters, frozen_weights
from livar_merge.signals import ClassFeatureStats, ImportanceTracker

if TYPE_CHECKING:
    from livar_merge.federated.client import ClientMemory
    from livar_merge.federated.config import TrainSettings


@dataclass(frozen=True)
class ClientData:
    """A client's local data and training settings in one round: ``indices`` of ``source``,
    ``num_classes``, ``settings`` and ``seed_for(*purpose)``, the round's seed for a purpose
    (``derive_seed(run seed, round, client, *purpose)``)."""

    source: BatchSource
    indices: np.ndarray
    num_classes: int
    settings: TrainSettings
    seed_for: Callable[..., int]


class Collector:
    """Base of the collectors: every hook does nothing."""

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before local training."""

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """A term added to the batch loss (``features [B, D]`` pre-logit, ``labels [B]``)."""
        return None

    def on_batch(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, last: bool
    ) -> None:
        """After each optimizer step (detached ``features [B, D]``, ``logits [B, C]``);
        ``last``: the batch belongs to the last local epoch."""

    def after_training(self, model: torch.nn.Module) -> None:
        """After local training: passes over the local data."""

    def contribute(self, update: ClientUpdate) -> None:
        """Write the statistic into ``update``."""


class OmegaCollector(Collector):
    """omega_A, omega_B per LoRA layer (Eq. 4) from an optimizer hook; with the released code's
    cumulative totals the tracker's state lives in the client's ``memory`` across rounds."""

    def __init__(self, settings: TrainSettings, memory: ClientMemory | None) -> None:
        self.settings = settings
        self.memory = memory
        self.tracker: ImportanceTracker | None = None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        tracker = ImportanceTracker(
            model,
            reduction=self.settings.omega_reduction,
            cumulative=self.settings.omega_cumulative,
        )
        if self.memory is not None and self.memory.tracker_state is not None:
            tracker.load_state_dict(self.memory.tracker_state)
        tracker.start_round()
        tracker.attach(optimizer)
        self.tracker = tracker

    def after_training(self, model: torch.nn.Module) -> None:
        if self.tracker is not None:
            self.tracker.detach()

    def contribute(self, update: ClientUpdate) -> None:
        if self.tracker is None:
            return
        importance = self.tracker.result()
        update.layer_names = importance.layer_names
        update.omega_a, update.omega_b = importance.omega_a, importance.omega_b
        if self.memory is not None:
            self.memory.tracker_state = self.tracker.state_dict()


class SigmaCollector(Collector):
    """sigma^(c), presence and counts per class (Eq. 6): from the last local epoch's batches
    (``sigma_pass="last-epoch"``) or from a pass after training (:func:`collect_class_stats`)."""

    def __init__(
        self, data: ClientData, pretrained_base: Mapping[str, torch.Tensor] | None
    ) -> None:
        self.data = data
        self.pretrained_base = pretrained_base
        settings = data.settings
        self.stats: ClassFeatureStats | None = None
        if settings.sigma_pass == "last-epoch":
            self.stats = ClassFeatureStats(
                data.num_classes, only_correct=settings.sigma_samples == "correct"
            )

    def on_batch(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, last: bool
    ) -> None:
        if self.stats is not None and last:
            self.stats.update(features.float(), labels, logits.float())

    def after_training(self, model: torch.nn.Module) -> None:
        if self.stats is None:
            self.stats = collect_class_stats(model, self.data, self.pretrained_base)

    def contribute(self, update: ClientUpdate) -> None:
        if self.stats is None:
            return
        result = self.stats.result()
        update.class_sigma = result.sigma
        update.class_present = result.present
        update.class_counts = result.count


class FeaturePass(Collector):
    """RegMean's input Grams (``gram``, ``head_gram``) and FedProto's class-mean features
    (``proto_mean``, ``proto_count``) from one inference pass after training."""

    def __init__(self, data: ClientData, *, gram: bool, prototypes: bool) -> None:
        self.data = data
        self.gram = gram
        self.prototypes = prototypes
        self.result: dict[str, Any] = {}

    def after_training(self, model: torch.nn.Module) -> None:
        data = self.data
        self.result = gram_and_prototype_pass(
            model,
            data.source,
            data.indices,
            data.num_classes,
            layers=list(find_lora_parameters(model)),
            batch_size=data.settings.eval_batch_size,
            want_gram=self.gram,
            want_prototypes=self.prototypes,
        )

    def contribute(self, update: ClientUpdate) -> None:
        update.extras.update(self.result)


class FisherCollector(Collector):
    """The diagonal empirical Fisher of the trainable parameters after training
    (``fisher_samples`` samples drawn with the round's ``"fisher"`` seed)."""

    def __init__(self, data: ClientData) -> None:
        self.data = data
        self.fisher: dict[str, torch.Tensor] | None = None

    def after_training(self, model: torch.nn.Module) -> None:
        data = self.data
        self.fisher = diagonal_fisher(
            model,
            data.source,
            data.indices,
            max_samples=data.settings.fisher_samples,
            seed=data.seed_for("fisher"),
        )

    def contribute(self, update: ClientUpdate) -> None:
        if self.fisher is not None:
            update.extras["fisher"] = self.fisher


class PrototypeTerm(Collector):
    """FedProto's regulariser with the broadcast global ``prototypes [C, D]`` (NaN rows: no
    prototype): ``weight * ||f(x) - P_y||^2`` (:func:`prototype_loss`) added to each batch."""

    def __init__(self, prototypes: torch.Tensor, weight: float) -> None:
        self.prototypes = prototypes
        self.weight = weight

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return self.weight * prototype_loss(features.float(), labels, self.prototypes)


class Collectors(Collector):
    """The round's collectors as one: each hook calls theirs in order; :meth:`loss` is the sum
    of their terms (None when none adds one)."""

    def __init__(self, members: list[Collector]) -> None:
        self.members = members

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for member in self.members:
            member.attach(model, optimizer)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for member in self.members:
            term = member.loss(features, labels)
            if term is not None:
                total = term if total is None else total + term
        return total

    def on_batch(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, last: bool
    ) -> None:
        for member in self.members:
            member.on_batch(features, labels, logits, last)

    def after_training(self, model: torch.nn.Module) -> None:
        for member in self.members:
            member.after_training(model)

    def contribute(self, update: ClientUpdate) -> None:
        for member in self.members:
            member.contribute(update)


def build_collectors(
    needs: frozenset[str],
    data: ClientData,
    *,
    memory: ClientMemory | None = None,
    broadcast: Mapping[str, torch.Tensor] | None = None,
    pretrained_base: Mapping[str, torch.Tensor] | None = None,
) -> Collectors:
    """The collectors of a round: one per statistic of ``needs`` (``omega``, ``sigma``,
    ``gram``/``prototypes`` sharing one pass, ``fisher``), then the loss term of what the
    method broadcast (``prototypes``, with ``settings.proto_weight > 0``)."""
    collectors: list[Collector] = []
    if "omega" in needs:
        collectors.append(OmegaCollector(data.settings, memory))
    if "sigma" in needs:
        collectors.append(SigmaCollector(data, pretrained_base))
    if needs & {"gram", "prototypes"}:
        collectors.append(FeaturePass(data, gram="gram" in needs, prototypes="prototypes" in needs))
    if "fisher" in needs:
        collectors.append(FisherCollector(data))
    prototypes = (broadcast or {}).get("prototypes")
    if prototypes is not None and data.settings.proto_weight > 0:
        collectors.append(PrototypeTerm(prototypes, data.settings.proto_weight))
    return Collectors(collectors)


# ------------------------------------------------------------------------------- sigma passes
def prototype_loss(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor
) -> torch.Tensor:
    """FedProto's regulariser: mean over samples whose class has a global prototype of
    ``||f(x) - P_y||^2``. ``features [B, D]``, ``prototypes [C, D]`` (NaN rows: no prototype)."""
    target = prototypes[labels]
    known = ~torch.isnan(target).any(dim=1)
    if not bool(known.any()):
        return features.new_zeros(())
    diff = features[known] - target[known]
    return (diff**2).sum(dim=1).mean()


@contextlib.contextmanager
def pretrained_backbone(
    model: torch.nn.Module, pretrained_base: Mapping[str, torch.Tensor] | None
) -> Iterator[torch.nn.Module]:
    """``model`` as the pretrained backbone W0: LoRA (and the trained head) disabled and, given
    ``pretrained_base``, the LoRA layers' frozen weights swapped for W0 (restored after)."""
    with frozen_weights(model, replace=pretrained_base), peft_view(model).disable_adapter():
        yield model


@torch.no_grad()
def trained_predictions(
    model: torch.nn.Module, source: BatchSource, indices: np.ndarray, settings: TrainSettings
) -> torch.Tensor:
    """The classes ``[len(indices)]`` the trained model (LoRA and trained head on) predicts for
    ``indices``, in order, on the normalised inputs it trains on (``model`` in eval mode)."""
    predicted = [torch.empty(0, dtype=torch.long, device=source.device)]
    with autocast_context(settings.precision, source.device):
        for x, _ in source.batches(indices, settings.eval_batch_size):
            predicted.append(forward_with_features(model, x)[1].float().argmax(1))
    return torch.cat(predicted)


@torch.no_grad()
def collect_class_stats(
    model: torch.nn.Module,
    data: ClientData,
    pretrained_base: Mapping[str, torch.Tensor] | None = None,
) -> ClassFeatureStats:
    """sigma^(c) from a pass over the client's data after training, or, for ``pretrained``,
    under the pretrained backbone W0 with the LoRA and trained head disabled (the released
    code). ``pretrained_base``: W0 of the LoRA layers' frozen weights, needed once merges
    have been folded into them (``lora_merge="product"``).

    ``pretrained`` with ``sigma_samples="correct"`` takes two passes: which samples are
    correctly classified is decided by the trained model (:func:`trained_predictions`; W0's
    head is peft's untrained initial one), the features are W0's."""
    source, indices, settings = data.source, data.indices, data.settings
    stats = ClassFeatureStats(data.num_classes, only_correct=settings.sigma_samples == "correct")
    was_training = model.training
    model.eval()
    context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    predicted: torch.Tensor | None = None
    if settings.sigma_pass == "pretrained":
        if stats.only_correct:
            predicted = trained_predictions(model, source, indices, settings)
        context = pretrained_backbone(model, pretrained_base)
    normalise = settings.sigma_inputs != "raw"
    done = 0
    with context, autocast_context(settings.precision, source.device):
        for x, y in source.batches(indices, settings.eval_batch_size, normalise=normalise):
            features, logits = forward_with_features(model, x)
            judged = logits.float() if predicted is None else predicted[done : done + len(y)]
            stats.update(features.float(), y, judged)
            done += len(y)
    model.train(was_training)
    return stats
