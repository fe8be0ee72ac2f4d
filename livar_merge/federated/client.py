"""Local training of one client: AdamW on LoRA + head, with one collector per statistic.

:func:`train_client` serves ``livar-fed``, the Flower ClientApp and the calibration pipeline:
a short loop (:func:`local_epochs`) that drives the round's collectors
(:mod:`livar_merge.federated.collectors`: omega, sigma, Grams and prototypes, Fisher,
FedProto's loss term) through their lifecycle hooks.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livar_merge.aggregation import ClientUpdate
from livar_merge.errors import ClientUpdateError
from livar_merge.federated.collectors import ClientData, Collector, build_collectors
from livar_merge.federated.config import TrainSettings
from livar_merge.federated.data import BatchSource, derive_seed
from livar_merge.federated.migrations import upgrade_memory_record
from livar_merge.federated.model import (
    autocast_context,
    forward_with_features,
    head_state,
    peft_view,
)
from livar_merge.lora_view import frozen_weights, lora_state


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
        record = upgrade_memory_record(record)  # checkpoints of earlier versions
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

    def metrics(self) -> dict[str, float | int]:
        """The report as ``ClientUpdate.report`` entries (``train_*``; the Flower reply's
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
    """Train ``model`` (holding the global state) on ``indices``; the update and report. Seeds
    derive from ``(seed, round, client)``, so a resumed run repeats it; ``needs``: one collector
    each (:func:`~livar_merge.federated.collectors.build_collectors`); ``broadcast``: what the
    method sent (``prototypes [C, D]``); ``pretrained_base``: W0 (``sigma_pass="pretrained"``)."""
    if len(indices) == 0:
        raise ClientUpdateError(f"client {client_id!r} has no training samples")
    torch.manual_seed(derive_seed(seed, round_index, client_id, "torch"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    seed_for = functools.partial(derive_seed, seed, round_index, client_id)
    data = ClientData(source, indices, num_classes, settings, seed_for)
    collectors = build_collectors(
        needs, data, memory=memory, broadcast=broadcast, pretrained_base=pretrained_base
    )
    collectors.attach(model, optimizer)
    start = time.perf_counter()
    loss, accuracy, steps = local_epochs(model, optimizer, data, collectors)
    statistics_start = time.perf_counter()
    collectors.after_training(model)
    update = ClientUpdate(client_id, len(indices), lora_state(model), *head_state(model))
    collectors.contribute(update)
    end = time.perf_counter()
    sizes = update.nbytes(), update.nbytes(extras_only=True)
    return update, TrainReport(loss, accuracy, steps, end - start, end - statistics_start, *sizes)


def local_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClientData,
    collectors: Collector,
) -> tuple[float, float, int]:
    """The local epochs: AdamW steps on cross-entropy plus the collectors' loss term, the
    collectors shown every batch. Returns the last epoch's mean loss and top-1 and the steps."""
    settings, device = data.settings, data.source.device
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, steps = 0, 0
    for epoch in range(settings.local_epochs):
        last = epoch == settings.local_epochs - 1
        for x, y in data.source.batches(
            data.indices,
            settings.batch_size,
            shuffle=True,
            seed=data.seed_for("epoch", epoch),
            augment=settings.augment,
        ):
            with autocast_context(settings.precision, device):
                features, logits = forward_with_features(model, x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                term = collectors.loss(features, y)
                if term is not None:
                    loss = loss + term
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            if last:
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
            collectors.on_batch(features.detach(), y, logits.detach(), last)
    return float(loss_sum / max(seen, 1)), float(correct) / max(seen, 1), steps


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
