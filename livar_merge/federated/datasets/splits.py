"""Train/test splits: :class:`DatasetSplits`, index subsets and seeded stratified sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.images import (
    EncodedImages,
    FileImages,
    InMemoryImages,
    LabeledImages,
    SubsetImages,
)


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test images; ``source`` = resolved path, "sklearn" or "generated"."""

    name: str
    train: LabeledImages
    test: LabeledImages
    classes: list[str]
    channels: int
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (labels lie in ``[0, num_classes)``)."""
        return len(self.classes)


def check_indices(indices: Any, n: int) -> np.ndarray:
    """Integer index array [K] with values in ``[0, n)``."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DatasetError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n:
        raise DatasetError(f"indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


def subset(ds: LabeledImages, indices: np.ndarray) -> LabeledImages:
    """The images ``ds[indices]`` (order kept); same classes/channels, same container kind."""
    idx = check_indices(indices, len(ds))
    if isinstance(ds, InMemoryImages):
        return InMemoryImages(ds.images[torch.from_numpy(idx)], ds.labels[idx], ds.classes)
    if isinstance(ds, FileImages):
        paths = [ds.paths[i] for i in idx]
        return FileImages(paths, ds.labels[idx], ds.classes, ds.image_size)
    if isinstance(ds, EncodedImages):
        blobs = [ds.blobs[i] for i in idx]
        origins = [ds.origins[i] for i in idx]
        return EncodedImages(blobs, ds.labels[idx], ds.classes, ds.image_size, origins)
    return SubsetImages(ds, idx)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices [n] of a class-proportional sample of ``labels`` [N] (deterministic).

    Class c gets floor or ceil of ``n * count_c / N`` samples (largest-remainder rounding, ties
    to the smaller class id); the members are drawn uniformly with ``default_rng(seed)``.
    """
    labels = np.asarray(labels)
    total = int(labels.shape[0]) if labels.ndim == 1 else -1
    if total < 0:
        raise DatasetError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 <= n <= total:
        raise DatasetError(f"cannot subsample {n} of {total} samples")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    remainder = n - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -(quota - take)))
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False)
        for c, k in enumerate(take)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train indices, test indices) with ``round(N * test_fraction)`` stratified tests."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(labels)
    test = stratified_subsample(labels, round(n * test_fraction), seed)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test
