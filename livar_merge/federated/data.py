"""Batches for training and evaluation: uint8 images -> normalised float tensors on the device.

In-memory datasets are indexed directly (no DataLoader overhead for small images); file
datasets go through a DataLoader with workers and pinned memory on GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from livar_merge.federated.datasets import LabeledImages


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the run seed and (round, client, purpose), stable across runs."""
    import hashlib

    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


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

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def batches(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over ``indices`` (shuffled with ``seed`` if asked); the last may be smaller."""
        order = np.asarray(indices, dtype=np.int64)
        gen = torch.Generator().manual_seed(seed)
        if shuffle:
            order = order[torch.randperm(len(order), generator=gen).numpy()]
        if self._images is not None:
            for start in range(0, len(order), batch_size):
                idx = torch.from_numpy(order[start : start + batch_size])
                x = self._to_float(self._images[idx])
                y = self._labels[idx].to(self.device, non_blocking=True)
                yield (augment_batch(x, gen) if augment else x), y
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
            x = self._to_float(x)
            yield (augment_batch(x, gen) if augment else x), y.to(self.device).long()


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
