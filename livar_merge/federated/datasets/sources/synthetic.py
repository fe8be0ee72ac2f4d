"""Generated, seeded, learnable images: per-class low-frequency templates, shifted, plus noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.images import InMemoryImages
from livar_merge.federated.datasets.registry import register_dataset
from livar_merge.federated.datasets.splits import DatasetSplits


def synthetic_images(
    labels: np.ndarray, templates: np.ndarray, rng: np.random.Generator, noise: float, shift: int
) -> np.ndarray:
    """uint8 [N, C, S, S]: templates [K, C, S, S] of ``labels``, rolled by <= shift px, + noise."""
    n, size = int(labels.shape[0]), int(templates.shape[-1])
    dy = rng.integers(-shift, shift + 1, size=n)
    dx = rng.integers(-shift, shift + 1, size=n)
    rows = (np.arange(size)[None, :] - dy[:, None]) % size  # [N, S]
    cols = (np.arange(size)[None, :] - dx[:, None]) % size  # [N, S]
    base = templates[labels]  # [N, C, S, S]
    channels = np.arange(templates.shape[1])
    shifted = base[
        np.arange(n)[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    values = shifted + noise * rng.standard_normal(shifted.shape, dtype=np.float32)
    return np.clip(np.rint(128.0 + 48.0 * values), 0, 255).astype(np.uint8)


def synthetic_templates(
    rng: np.random.Generator, num_classes: int, channels: int, size: int, waves: int = 6
) -> np.ndarray:
    """float32 [K, C, S, S] low-frequency class templates: sums of random cosine waves.

    Each wave has integer frequencies in {0, 1, 2} per axis (periodic, so rolling keeps it
    smooth), amplitude ~ N(0, 1) / sqrt(waves) and a random phase.
    """
    grid = np.arange(size, dtype=np.float32) * (2.0 * np.pi / size)
    fy = rng.integers(0, 3, size=(num_classes, channels, waves)).astype(np.float32)
    fx = rng.integers(0, 3, size=(num_classes, channels, waves)).astype(np.float32)
    amp = rng.standard_normal((num_classes, channels, waves)).astype(np.float32) / np.sqrt(waves)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(num_classes, channels, waves)).astype(np.float32)
    angle = (
        fy[..., None, None] * grid[:, None]
        + fx[..., None, None] * grid[None, :]
        + phase[..., None, None]
    )  # [K, C, W, S, S]
    return (amp[..., None, None] * np.cos(angle)).sum(axis=2).astype(np.float32)


@register_dataset(
    "synthetic",
    description="generated, seeded, learnable: per-class low-frequency template + shift + noise",
    obtain="it is generated on the fly from the seed; nothing to obtain",
    layout="none (data_root is ignored)",
)
def _load_synthetic(
    root: Path | None,
    *,
    image_size: int | None,
    seed: int,
    num_classes: int = 10,
    channels: int = 3,
    train_per_class: int = 100,
    test_per_class: int = 20,
    noise: float = 0.5,
    max_shift: int = 2,
) -> DatasetSplits:
    """Synthetic images of size ``image_size`` (default 32); deterministic for a seed."""
    size = 32 if image_size is None else image_size
    checks = {
        "num_classes": (num_classes, 1),
        "train_per_class": (train_per_class, 1),
        "test_per_class": (test_per_class, 1),
        "max_shift": (max_shift, 0),
    }
    for key, (value, low) in checks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DatasetError(f"synthetic: {key} must be an int >= {low}, got {value!r}")
    if channels not in (1, 3):
        raise DatasetError(f"synthetic: channels must be 1 or 3, got {channels!r}")
    if not noise >= 0:
        raise DatasetError(f"synthetic: noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    templates = synthetic_templates(rng, num_classes, channels, size)
    classes = [f"class_{k}" for k in range(num_classes)]
    splits = []
    for per_class in (train_per_class, test_per_class):
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
        images = synthetic_images(labels, templates, rng, noise, max_shift)
        splits.append(InMemoryImages(torch.from_numpy(images), labels, classes))
    return DatasetSplits("synthetic", splits[0], splits[1], classes, channels, "generated")
