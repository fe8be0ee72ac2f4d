"""The image containers (:class:`LabeledImages` and its kinds), decoding, resizing, label checks.

Every item is a ``(uint8 tensor [C, H, W], int label)`` pair.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from livar_merge.errors import DatasetError


class LabeledImages(Dataset):
    """Images with integer labels. ``__getitem__(i) -> (uint8 tensor [C, H, W], int label)``.

    Attributes: ``labels`` int64 [N]; ``classes`` class names (index = label); ``channels`` 1 or 3.
    """

    labels: np.ndarray
    classes: list[str]
    channels: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def _index(self, index: int) -> int:
        """Validate ``index`` (negative allowed) and return it in ``[0, N)``."""
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return i % n


def first_label_outside(labels: np.ndarray, num_classes: int) -> int | None:
    """Position of the first label outside ``[0, num_classes)``, None if all lie inside."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    return int(bad[0]) if len(bad) else None


def check_labels(labels: Any, count: int, classes: Sequence[str]) -> np.ndarray:
    """Labels as int64 [count], each in ``[0, len(classes))``."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != count:
        raise DatasetError(f"expected {count} labels in a 1-D array, got shape {arr.shape}")
    if count and not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = first_label_outside(arr, len(classes)) if count else None
    if bad is not None:
        raise DatasetError(
            f"label {int(arr[bad])} at position {bad} is outside [0, {len(classes)}) "
            f"({len(classes)} classes)"
        )
    return arr


class InMemoryImages(LabeledImages):
    """Decoded images held in one uint8 tensor ``images`` [N, C, H, W], C in {1, 3}."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, classes: Sequence[str]) -> None:
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DatasetError(
                f"images must be a uint8 tensor [N, C, H, W] with C in (1, 3), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        self.classes = list(classes)
        self.labels = check_labels(labels, images.shape[0], self.classes)
        self.channels = int(images.shape[1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        return self.images[i], int(self.labels[i])


class _DecodedImages(LabeledImages):
    """Images decoded lazily with PIL as RGB at ``__getitem__``; resized if ``image_size``."""

    image_size: int | None

    def _encoded(self, i: int) -> tuple[Path | bytes, str]:
        """Image i's file or bytes, and where it comes from (for error messages)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        image = decode_image(*self._encoded(i))
        if self.image_size is not None:
            image = resize_images(image, self.image_size)
        return image, int(self.labels[i])


class FileImages(_DecodedImages):
    """Image files decoded lazily with PIL as RGB; resized at ``__getitem__`` if ``image_size``."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        classes: Sequence[str],
        image_size: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.classes = list(classes)
        self.labels = check_labels(labels, len(self.paths), self.classes)
        self.image_size = image_size
        self.channels = 3

    def _encoded(self, i: int) -> tuple[Path | bytes, str]:
        return self.paths[i], str(self.paths[i])


class EncodedImages(_DecodedImages):
    """Encoded image bytes (e.g. from parquet) decoded lazily with PIL as RGB.

    ``origins[i]`` says where blob i came from (file and row), for error messages.
    """

    def __init__(
        self,
        blobs: Sequence[bytes],
        labels: np.ndarray,
        classes: Sequence[str],
        image_size: int | None = None,
        origins: Sequence[str] | None = None,
    ) -> None:
        self.blobs = list(blobs)
        self.classes = list(classes)
        self.labels = check_labels(labels, len(self.blobs), self.classes)
        self.image_size = image_size
        self.origins = (
            list(origins) if origins is not None else [f"blob {i}" for i in range(len(self.blobs))]
        )
        self.channels = 3

    def _encoded(self, i: int) -> tuple[Path | bytes, str]:
        return self.blobs[i], self.origins[i]


class SubsetImages(LabeledImages):
    """A view of another :class:`LabeledImages` restricted to ``indices`` (fallback of subset)."""

    def __init__(self, base: LabeledImages, indices: np.ndarray) -> None:
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]
        self.classes = list(base.classes)
        self.channels = base.channels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[self._index(index)])]


def decode_image(source: Path | bytes, what: str) -> torch.Tensor:
    """Decode an image file or encoded bytes as RGB -> uint8 tensor [3, H, W]."""
    from PIL import Image

    try:
        handle = source if isinstance(source, Path) else io.BytesIO(source)
        with Image.open(handle) as im:
            array = np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for bad/missing files
        raise DatasetError(f"cannot decode image {what}: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 [C, H, W] or [N, C, H, W] to size x size (uint8)."""
    if images.shape[-2:] == (size, size):
        return images
    single = images.ndim == 3
    batch = images.unsqueeze(0) if single else images
    out = torch.empty((*batch.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, batch.shape[0], chunk):
        part = batch[start : start + chunk].float()
        resized = F.interpolate(
            part, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out[0] if single else out
