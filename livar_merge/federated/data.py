"""Batches for training and evaluation: uint8 images -> normalised float tensors on the device.

In-memory datasets are indexed directly (no DataLoader overhead for small images); file
datasets go through a DataLoader with workers and pinned memory on GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvf

from livar_merge.errors import ConfigError
from livar_merge.federated.datasets import LabeledImages
from livar_merge.federated.seeds import derive_seed as derive_seed  # its former home


class BatchSource:
    """Serves ``(x [B, 3, H, W] float, y [B] long)`` batches of a dataset on ``device``.

    Grey images are repeated to 3 channels; pixels are scaled to [0, 1] and normalised with
    ``mean``/``std``.
    """

    def __init__(
        self,
        dataset: LabeledImages,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.num_workers = num_workers
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        images = getattr(dataset, "images", None)
        self._images: torch.Tensor | None = images
        self._labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self._labels)

    def _to_float(self, x: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std if normalise else x

    def batches(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: str = "off",
        normalise: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over ``indices`` (shuffled with ``seed`` if asked); the last may be smaller.
        ``augment``: ``"off"`` or a name of :data:`AUGMENTATIONS` (drawn from ``seed`` too);
        ``normalise=False``: raw pixels in [0, 1]."""
        order = np.asarray(indices, dtype=np.int64)
        transform = augmentation(augment)
        gen = torch.Generator().manual_seed(seed)
        if shuffle:
            order = order[torch.randperm(len(order), generator=gen).numpy()]
        if self._images is not None:
            for start in range(0, len(order), batch_size):
                idx = torch.from_numpy(order[start : start + batch_size])
                x = self._to_float(self._images[idx], normalise)
                y = self._labels[idx].to(self.device, non_blocking=True)
                yield (transform(x, gen) if transform else x), y
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, order.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            x = self._to_float(x, normalise)
            yield (transform(x, gen) if transform else x), y.to(self.device).long()


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by 1/8 of the side, and random horizontal flip."""
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out)


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def resized_crop_params(
    height: int,
    width: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, drawn exactly as torchvision's
    ``RandomResizedCrop.get_params`` draws it (10 tries, then a centre crop), from ``gen``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(
            torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=gen).item()
        )
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) of every image of ``x [B, C, H, W]``
    back to ``H x W`` (bilinear, antialiased, as torchvision), then a random horizontal flip:
    the released code's training transform."""
    _, _, height, width = x.shape
    crops = [
        tvf.resized_crop(
            image, *resized_crop_params(height, width, gen), size=[height, width], antialias=True
        )
        for image in x
    ]
    return _flip(torch.stack(crops), gen)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "pad-crop": augment_batch,
    "rrc": random_resized_crop,
}


def augmentation(
    name: str | bool,
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The batch transform of ``name`` (None for ``"off"``); ``True``/``False`` read as
    ``"pad-crop"``/``"off"`` (the boolean option of earlier versions)."""
    if isinstance(name, bool):
        name = "pad-crop" if name else "off"
    if name == "off":
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; choose 'off' or {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
