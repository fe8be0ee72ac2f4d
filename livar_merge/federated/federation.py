"""The federation of a run: runtime (device, precision, local-training settings), data, the
Dirichlet split, the seeded peft model and its batch sources. One builder for ``livar-fed``
(in-process), both Flower apps and ``livar-calibrate``'s proxy training.

The builders read a run's options through :class:`FederationInputs`, which ``livar-fed``'s
FedConfig and ``livar-calibrate``'s CalibConfig both satisfy (each builds its own
:class:`~livar_merge.federated.config.TrainSettings`); the dataset, seed and beta are passed
explicitly (a calibration has several).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from livar_merge.federated.client import evaluate
from livar_merge.federated.config import LoraMerge, Partitioner, Precision, TrainSettings
from livar_merge.federated.data import BatchSource, derive_seed
from livar_merge.federated.datasets import (
    LabeledImages,
    load_dataset,
    loader_options,
    stratified_subsample,
    subset,
)
from livar_merge.federated.model import ModelInfo, build_model
from livar_merge.federated.partition import class_count_table, partition_clients
from livar_merge.federated.statistics import feature_moments
from livar_merge.lora_view import base_weight, peft_scalings


class ModelInputs(Protocol):
    """The options of the seeded peft model (:func:`build_seeded_model`)."""

    model: str
    weights: str
    image_size: int
    lora_rank: int
    lora_alpha: float

    @property
    def lora_dropout(self) -> float: ...

    def architecture_overrides(self) -> dict[str, int]: ...


class DataInputs(Protocol):
    """The options of a run's data (:func:`load_train_test`)."""

    data_root: str | None
    image_size: int
    max_train: int | None
    max_test: int | None
    test_fraction: float
    image_column: str
    label_column: str


class FederationInputs(ModelInputs, DataInputs, Protocol):
    """Everything :func:`build_federation` reads of a run's config."""

    num_clients: int
    min_client_samples: int
    partitioner: Partitioner
    shards_per_client: int
    classes_per_client: int
    device: str
    precision: Precision
    threads: int | None

    @property
    def num_workers(self) -> int: ...
    @property
    def lora_merge(self) -> LoraMerge: ...

    def train_settings(self, precision: str) -> TrainSettings: ...


# ----------------------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


# -------------------------------------------------------------------------------- data
def load_train_test(
    dataset: str, config: DataInputs, seed: int, *, data_root: str | None = None
) -> tuple[Any, LabeledImages, LabeledImages]:
    """``(splits, train, test)`` with the stratified subsamples ``max_train``/``max_test``;
    ``data_root`` overrides the config's dataset folder (e.g. on a Flower node)."""
    root = data_root if data_root else config.data_root
    options = {
        name: getattr(config, name)
        for name in loader_options(dataset)
        if name in ("test_fraction", "image_column", "label_column")
    }
    splits = load_dataset(dataset, root, image_size=config.image_size, seed=seed, **options)
    train, test = splits.train, splits.test
    max_train, max_test = config.max_train, config.max_test
    if max_train is not None and max_train < len(train):
        train = subset(train, stratified_subsample(np.asarray(train.labels), max_train, seed))
    if max_test is not None and max_test < len(test):
        test = subset(test, stratified_subsample(np.asarray(test.labels), max_test, seed))
    return splits, train, test


def build_seeded_model(
    config: ModelInputs, num_classes: int, seed: int
) -> tuple[torch.nn.Module, ModelInfo]:
    """The peft LoRA ViT of ``config``, initialised from ``seed`` (same seed, same weights)."""
    torch.manual_seed(derive_seed(seed, "model-init"))
    return build_model(
        config.model,
        num_classes,
        weights=config.weights,
        image_size=config.image_size,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        overrides=config.architecture_overrides(),
    )


# -------------------------------------------------------------------------- federation
@dataclass
class Federation:
    """Everything a run builds before its first round (same config and seed: same objects)."""

    device: torch.device
    settings: TrainSettings  # local training, with the resolved precision
    num_classes: int
    dataset_source: Any  # where the dataset was read from (DatasetSplits.source)
    parts: list[np.ndarray]  # client m's training indices
    partition_table: pd.DataFrame  # clients x classes sample counts
    model: torch.nn.Module
    info: ModelInfo
    scalings: dict[str, float]  # peft scaling per LoRA layer
    train_source: BatchSource
    test_source: BatchSource
    # W0 of the LoRA layers' frozen weights, kept for sigma_pass="pretrained" when merges are
    # folded into them (lora_merge="product"); None otherwise (the frozen weights stay W0)
    pretrained_base: dict[str, torch.Tensor] | None = None

    @property
    def precision(self) -> str:
        return self.settings.precision

    @property
    def test_size(self) -> int:
        return len(self.test_source)

    @property
    def eval_batch_size(self) -> int:
        return self.settings.eval_batch_size

    @property
    def client_ids(self) -> list[str]:
        return [client_id(m) for m in range(len(self.parts))]

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        """Test top-1 and loss of ``model`` on the run's test set."""
        return evaluate(
            model,
            self.test_source,
            np.arange(self.test_size),
            batch_size=self.eval_batch_size,
            precision=self.precision,
        )

    def client_moments(
        self, model: torch.nn.Module, client: int, *, full_covariance: bool
    ) -> dict[str, np.ndarray]:
        """CCVR: class feature moments of client ``client``'s data under ``model``."""
        return feature_moments(
            model,
            self.train_source,
            self.parts[client],
            self.num_classes,
            batch_size=self.eval_batch_size,
            full_covariance=full_covariance,
        )


def client_id(index: int) -> str:
    """The id of client ``index`` (``client_<m>``; both engines and the calibration)."""
    return f"client_{index}"


def build_federation(
    config: FederationInputs,
    *,
    dataset: str,
    seed: int,
    beta: float,
    data_root: str | None = None,
    threads: int | None = None,
) -> Federation:
    """Build the federation of ``config`` on ``dataset`` split with ``beta`` and ``seed``
    (``data_root`` overrides the dataset folder, e.g. on a Flower node; ``threads`` the torch
    CPU threads, default ``config.threads``)."""
    threads = threads if threads is not None else config.threads
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    splits, train, test = load_train_test(dataset, config, seed, data_root=data_root)
    labels = np.asarray(train.labels)
    parts = partition_clients(
        labels,
        config.num_clients,
        partitioner=config.partitioner,
        beta=beta,
        seed=seed,
        min_samples=config.min_client_samples,
        shards_per_client=config.shards_per_client,
        classes_per_client=config.classes_per_client,
    )
    model, info = build_seeded_model(config, splits.num_classes, seed)
    model.to(device)
    workers = config.num_workers

    def batch_source(images: LabeledImages) -> BatchSource:
        return BatchSource(images, mean=info.mean, std=info.std, device=device, num_workers=workers)

    settings = config.train_settings(precision)
    pretrained_base = None
    if settings.sigma_pass == "pretrained" and config.lora_merge == "product":
        modules = dict(model.named_modules())
        pretrained_base = {
            layer: base_weight(modules[layer]).detach().clone() for layer in info.lora_layers
        }
    return Federation(
        device=device,
        settings=settings,
        num_classes=splits.num_classes,
        dataset_source=splits.source,
        parts=list(parts),
        partition_table=class_count_table(parts, labels, splits.num_classes),
        model=model,
        info=info,
        scalings=peft_scalings(model),
        train_source=batch_source(train),
        test_source=batch_source(test),
        pretrained_base=pretrained_base,
    )
