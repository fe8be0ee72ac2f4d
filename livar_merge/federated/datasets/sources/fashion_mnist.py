"""Fashion-MNIST from its four idx files (raw or gzipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.formats.folders import need_root
from livar_merge.federated.datasets.formats.idx import idx_file, read_idx
from livar_merge.federated.datasets.images import first_label_outside
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.sources.common import in_memory_pair
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "fashion-mnist"
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _fashion_split(folder: Path, prefix: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 [N, 1, H, W] and labels [N] of the ``train`` or ``t10k`` idx pair."""
    found = {}
    for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        base = f"{prefix}-{kind}"
        path = idx_file(folder, base)
        if path is None:
            raise dataset_error(
                NAME, f"expected {folder / base} or {folder / base}.gz, neither exists."
            )
        try:
            found[ndim] = (path, read_idx(path, ndim))
        except DatasetError as exc:
            raise dataset_error(NAME, str(exc), hint=False) from exc
    (image_path, images), (label_path, labels) = found[3], found[1]
    if images.shape[0] != labels.shape[0]:
        raise dataset_error(
            NAME,
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels",
            hint=False,
        )
    bad = first_label_outside(labels, len(FASHION_MNIST_CLASSES))
    if bad is not None:
        raise dataset_error(
            NAME,
            f"{label_path}: label {int(labels[bad])} at item {bad} is outside [0, 10)",
            hint=False,
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64)


@register_dataset(
    NAME,
    description="Fashion-MNIST: 10 clothing classes, 28x28 greyscale, 60k train / 10k test",
    obtain=(
        "apt-get install dataset-fashion-mnist (the Debian/Ubuntu package installs it in "
        f"{FASHION_MNIST_DEFAULT_ROOT}), or the four idx .gz files from Zalando Research's "
        "Fashion-MNIST project on GitHub"
    ),
    layout=(
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, each raw or .gz, in data_root (default "
        f"{FASHION_MNIST_DEFAULT_ROOT}), data_root/fashion-mnist or data_root/FashionMNIST/raw"
    ),
)
def _load_fashion_mnist(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """Fashion-MNIST from its four idx files."""
    root = need_root(NAME, root if root is not None else FASHION_MNIST_DEFAULT_ROOT)
    candidates = (root, root / "fashion-mnist", root / "FashionMNIST" / "raw")
    folder = next(
        (f for f in candidates if idx_file(f, "train-images-idx3-ubyte") is not None), root
    )
    train = _fashion_split(folder, "train")
    test = _fashion_split(folder, "t10k")
    return in_memory_pair(
        NAME, train, test, FASHION_MNIST_CLASSES, image_size=image_size, source=str(folder)
    )
