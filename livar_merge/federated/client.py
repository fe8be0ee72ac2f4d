"""Local training of one client: AdamW on LoRA + head, with LIVAR's signals attached.

The same function serves ``livar-fed``, the Flower ClientApp and the calibration pipeline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livar_merge.aggregation import ClientUpdate
from livar_merge.errors import ClientUpdateError
from livar_merge.federated.data import BatchSource, derive_seed
from livar_merge.federated.model import (
    forward_with_features,
    frozen_weights,
    head_module,
    peft_view,
)
from livar_merge.federated.peft_keys import lora_state
from livar_merge.federated.statistics import diagonal_fisher, gram_and_prototype_pass
from livar_merge.signals import (
    ClassFeatureStats,
    ImportanceTracker,
    Reduction,
    find_lora_parameters,
)


@dataclass(frozen=True)
class TrainSettings:
    """What local training needs from the run configuration."""

    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: str = "off"  # "off", "pad-crop", "rrc" (livar_merge.federated.data)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    omega_reduction: Reduction = "matrix"
    omega_cumulative: bool = False
    sigma_samples: str = "correct"
    sigma_pass: str = "final"
    sigma_inputs: str = "normalised"  # or "raw" [0, 1] pixels (released code)
    eval_batch_size: int = 256
    proto_weight: float = 1.0  # FedProto's lambda (used when prototypes are given)
    fisher_samples: int = 256  # samples of the diagonal Fisher (Fisher averaging)


@dataclass
class ClientMemory:
    """Per-client state kept across rounds (the cumulative omega totals of the released code).

    One codec for both engines: :meth:`to_record` gives plain JSON/ConfigRecord values
    (``omega`` as a list of Python floats, float64 exactly), :meth:`from_record` restores it
    as a float64 tensor.
    """

    tracker_state: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any] | None:
        """``{"omega": [float], "steps": int, "layer-names": [str]}``, or None when empty."""
        if self.tracker_state is None:
            return None
        state = self.tracker_state
        return {
            "omega": [float(v) for v in state["omega"].tolist()],
            "steps": int(state["steps"]),
            "layer-names": [str(n) for n in state["layer_names"]],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> ClientMemory:
        """Inverse of :meth:`to_record` (None or empty: a fresh memory)."""
        if not record:
            return cls()
        if "tracker_state" in record:  # state.json of checkpoints written before the codec
            legacy = record["tracker_state"]
            record = {**legacy, "layer-names": legacy["layer_names"]}
        return cls(
            tracker_state={
                "omega": torch.tensor(list(record["omega"]), dtype=torch.float64),
                "steps": int(record["steps"]),
                "layer_names": [str(n) for n in record["layer-names"]],
            }
        )


@dataclass
class TrainReport:
    """Training metrics of one client round."""

    loss: float
    accuracy: float
    steps: int
    seconds: float  # everything: training and the statistic passes after it
    statistics_seconds: float = 0.0  # the passes after training (sigma, Grams, Fisher, ...)
    upload_bytes: int = 0  # tensors and arrays of the ClientUpdate
    statistics_bytes: int = 0  # of which the method's extra statistics

    def extras(self) -> dict[str, float | int]:
        """The report as ``ClientUpdate.extras`` entries (``train_*``; the Flower reply's
        ``train-*`` metrics), the one source of ``clients.csv``'s columns on both engines."""
        return {
            "train_loss": float(self.loss),
            "train_accuracy": float(self.accuracy),
            "train_steps": int(self.steps),
            "train_seconds": float(self.seconds),
            "train_statistics_seconds": float(self.statistics_seconds),
            "train_upload_bytes": int(self.upload_bytes),
            "train_statistics_bytes": int(self.statistics_bytes),
        }


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    source: BatchSource,
    indices: np.ndarray,
    num_classes: int,
    settings: TrainSettings,
    pretrained_base: Mapping[str, torch.Tensor] | None = None,
) -> ClassFeatureStats:
    """sigma^(c) from a pass over the client's data after training, or, for ``pretrained``,
    under the pretrained backbone W0 with the LoRA and trained head disabled (the released
    code). ``pretrained_base``: W0 of the LoRA layers' frozen weights, needed once merges
    have been folded into them (``lora_merge="product"``).

    ``pretrained`` with ``sigma_samples="correct"`` takes two passes: which samples are
    correctly classified is decided by the trained model (:func:`trained_predictions`; W0's
    head is peft's untrained initial one), the features are W0's."""
    stats = ClassFeatureStats(num_classes, only_correct=settings.sigma_samples == "correct")
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


def train_client(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    *,
    client_id: str,
    num_classes: int,
    settings: TrainSettings,
    seed: int,
    round_index: int,
    needs: frozenset[str] = frozenset({"omega", "sigma"}),
    memory: ClientMemory | None = None,
    broadcast: Mapping[str, torch.Tensor] | None = None,
    pretrained_base: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ClientUpdate, TrainReport]:
    """Train ``model`` (already holding the global state) on ``indices`` and build the update.

    Randomness (shuffling, augmentation, dropout) is derived from ``(seed, round, client)`` so a
    resumed run repeats it exactly. ``needs`` lists the statistics the method uses (``omega``,
    ``sigma``, ``gram``, ``prototypes``, ``fisher``); ``broadcast``: what the method sent with
    the round (``Aggregator.broadcast``); its ``prototypes [C, D]`` switch on FedProto's
    regulariser with weight ``settings.proto_weight``. ``pretrained_base``: the
    pretrained frozen weights W0 for ``sigma_pass="pretrained"`` (:func:`pretrained_backbone`).
    """
    if len(indices) == 0:
        raise ClientUpdateError(f"client {client_id!r} has no training samples")
    torch.manual_seed(derive_seed(seed, round_index, client_id, "torch"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    prototypes = (broadcast or {}).get("prototypes")
    tracker = None
    if "omega" in needs:
        tracker = ImportanceTracker(
            model, reduction=settings.omega_reduction, cumulative=settings.omega_cumulative
        )
        if memory is not None and memory.tracker_state is not None:
            tracker.load_state_dict(memory.tracker_state)
        tracker.start_round()
        tracker.attach(optimizer)
    scaler = torch.amp.GradScaler(source.device.type, enabled=settings.precision == "fp16")
    stats = None
    if "sigma" in needs and settings.sigma_pass == "last-epoch":
        stats = ClassFeatureStats(num_classes, only_correct=settings.sigma_samples == "correct")

    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=source.device)
    correct = torch.zeros((), dtype=torch.int64, device=source.device)
    seen, steps = 0, 0
    for epoch in range(settings.local_epochs):
        last = epoch == settings.local_epochs - 1
        batch_seed = derive_seed(seed, round_index, client_id, "epoch", epoch)
        for x, y in source.batches(
            indices, settings.batch_size, shuffle=True, seed=batch_seed, augment=settings.augment
        ):
            with autocast_context(settings.precision, source.device):
                features, logits = forward_with_features(model, x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                if prototypes is not None and settings.proto_weight > 0:
                    loss = loss + settings.proto_weight * prototype_loss(
                        features.float(), y, prototypes
                    )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            if last:
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
            if stats is not None and last:
                stats.update(features.detach().float(), y, logits.detach().float())
    if tracker is not None:
        tracker.detach()
    statistics_start = time.perf_counter()
    if "sigma" in needs and stats is None:
        stats = collect_class_stats(
            model, source, indices, num_classes, settings, pretrained_base=pretrained_base
        )

    extras = collect_method_statistics(
        model,
        source,
        indices,
        num_classes,
        settings,
        needs,
        seed=derive_seed(seed, round_index, client_id, "fisher"),
    )
    head = head_module(model)
    update = ClientUpdate(
        client_id=client_id,
        num_samples=len(indices),
        lora=lora_state(model),
        head_weight=head.weight.detach().clone(),
        head_bias=None if head.bias is None else head.bias.detach().clone(),
        extras=extras,
    )
    if tracker is not None:
        importance = tracker.result()
        update.layer_names = importance.layer_names
        update.omega_a, update.omega_b = importance.omega_a, importance.omega_b
        if memory is not None:
            memory.tracker_state = tracker.state_dict()
    if stats is not None:
        result = stats.result()
        update.class_sigma = result.sigma
        update.class_present = result.present
        update.class_counts = result.count
    end = time.perf_counter()
    report = TrainReport(
        loss=float(loss_sum / max(seen, 1)),
        accuracy=float(correct) / max(seen, 1),
        steps=steps,
        seconds=end - start,
        statistics_seconds=end - statistics_start,
        upload_bytes=update.nbytes(),
        statistics_bytes=update.nbytes(extras_only=True),
    )
    return update, report


def collect_method_statistics(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    num_classes: int,
    settings: TrainSettings,
    needs: frozenset[str],
    *,
    seed: int,
) -> dict[str, Any]:
    """The baselines' statistics (``gram``, ``prototypes``, ``fisher``) after local training."""
    extras: dict[str, Any] = {}
    if needs & {"gram", "prototypes"}:
        extras.update(
            gram_and_prototype_pass(
                model,
                source,
                indices,
                num_classes,
                layers=list(find_lora_parameters(model)),
                batch_size=settings.eval_batch_size,
                want_gram="gram" in needs,
                want_prototypes="prototypes" in needs,
            )
        )
    if "fisher" in needs:
        extras["fisher"] = diagonal_fisher(
            model, source, indices, max_samples=settings.fisher_samples, seed=seed
        )
    return extras


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    *,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``indices``.

    The LoRA is merged into the weights for the pass (faster on CPU) and the exact original
    weights are restored afterwards, so evaluation never perturbs training.
    """
    model.eval()
    merged = hasattr(model, "merge_adapter")
    with frozen_weights(model) if merged else contextlib.nullcontext(model):
        if merged:
            peft_view(model).merge_adapter()
        try:
            correct, loss, n = 0, 0.0, 0
            with autocast_context(precision, source.device):
                for x, y in source.batches(indices, batch_size):
                    logits = model(x).float()
                    loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(1) == y).sum())
                    n += len(y)
        finally:  # peft's merged flag back; frozen_weights restores the exact weights
            if merged:
                peft_view(model).unmerge_adapter()
    return correct / max(n, 1), loss / max(n, 1)
