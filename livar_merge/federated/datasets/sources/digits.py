"""scikit-learn's bundled 8x8 digits, split with a seeded stratified test fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from livar_merge.federated.datasets.images import InMemoryImages, resize_images
from livar_merge.federated.datasets.registry import register_dataset
from livar_merge.federated.datasets.sources.common import split_dataset
from livar_merge.federated.datasets.splits import DatasetSplits


@register_dataset(
    "digits",
    description="scikit-learn digits: 10 classes, 1797 8x8 greyscale images",
    obtain="it ships with scikit-learn (sklearn.datasets.load_digits); nothing to download",
    layout="none (data_root is ignored)",
)
def _load_digits(
    root: Path | None, *, image_size: int | None, seed: int, test_fraction: float = 0.2
) -> DatasetSplits:
    """scikit-learn's bundled digits; values 0..16 scaled to uint8 by *255/16, rounded."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)[:, None])
    if image_size is not None:
        images = resize_images(images, image_size)
    labels = np.asarray(bunch.target, dtype=np.int64)
    full = InMemoryImages(images, labels, [str(i) for i in range(10)])
    return split_dataset("digits", full, seed=seed, test_fraction=test_fraction, source="sklearn")
