"""Building blocks shared by the loaders: a seeded stratified split, an in-memory split pair."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.images import InMemoryImages, LabeledImages, resize_images
from livar_merge.federated.datasets.registry import dataset_error
from livar_merge.federated.datasets.splits import DatasetSplits, stratified_split, subset


def split_dataset(
    name: str, full: LabeledImages, *, seed: int, test_fraction: float, source: str
) -> DatasetSplits:
    """A seeded stratified train/test split of a whole dataset ``full``."""
    try:
        train_idx, test_idx = stratified_split(full.labels, test_fraction, seed)
    except DatasetError as exc:
        raise dataset_error(name, str(exc), hint=False) from exc
    return DatasetSplits(
        name, subset(full, train_idx), subset(full, test_idx), full.classes, full.channels, source
    )


def in_memory_pair(
    name: str,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    classes: Sequence[str],
    *,
    image_size: int | None,
    source: str,
) -> DatasetSplits:
    """DatasetSplits of given (uint8 images [N, C, H, W], labels [N]) train and test parts."""
    classes = list(classes)
    parts = []
    for images, labels in (train, test):
        if image_size is not None:
            images = resize_images(images, image_size)
        parts.append(InMemoryImages(images, labels, classes))
    return DatasetSplits(name, parts[0], parts[1], classes, parts[0].channels, source)
