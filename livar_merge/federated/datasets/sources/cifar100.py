"""CIFAR-100, python version: pickled ``train``, ``test`` and ``meta`` batches (fine labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from livar_merge.federated.datasets.formats.cifar_pickle import load_pickle
from livar_merge.federated.datasets.formats.folders import archive_folder
from livar_merge.federated.datasets.images import first_label_outside
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.sources.common import in_memory_pair
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "cifar100"


def _cifar_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and fine labels [N] of one CIFAR-100 batch."""
    batch = load_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in batch:
            raise dataset_error(
                NAME, f"{path}: missing key b{key!r}; has {sorted(batch)}", hint=False
            )
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise dataset_error(
            NAME,
            f"{path}: field b'data' must be uint8 [N, 3072], is {data.dtype} {data.shape}",
            hint=False,
        )
    labels = np.asarray(batch["fine_labels"])
    if labels.shape != (data.shape[0],) or (
        labels.size and not np.issubdtype(labels.dtype, np.integer)
    ):
        raise dataset_error(
            NAME,
            f"{path}: field b'fine_labels' must hold {data.shape[0]} ints, "
            f"is {labels.dtype} {labels.shape}",
            hint=False,
        )
    bad = first_label_outside(labels, num_classes)
    if bad is not None:
        raise dataset_error(
            NAME,
            f"{path}: field b'fine_labels'[{bad}] = {int(labels[bad])} is outside "
            f"[0, {num_classes})",
            hint=False,
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, labels.astype(np.int64)


@register_dataset(
    NAME,
    description="CIFAR-100: 100 classes, 32x32 RGB, 50k train / 10k test",
    obtain=(
        "download the CIFAR-100 python version, cifar-100-python.tar.gz, from Alex Krizhevsky's "
        "CIFAR page (University of Toronto) and extract it into data_root"
    ),
    layout="cifar-100-python/{train,test,meta} (data_root = that folder or its parent)",
)
def _load_cifar100(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """CIFAR-100 python pickle batches (fine labels)."""
    folder = archive_folder(NAME, root, "cifar-100-python", "meta")
    meta = load_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise dataset_error(NAME, f"{folder / 'meta'}: missing key b'fine_label_names'", hint=False)
    classes = [
        n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]
    ]
    train = _cifar_batch(folder / "train", len(classes))
    test = _cifar_batch(folder / "test", len(classes))
    return in_memory_pair(NAME, train, test, classes, image_size=image_size, source=str(folder))
