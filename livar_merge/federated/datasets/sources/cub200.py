"""Caltech-UCSD Birds-200-2011 with its official train/test split (metadata text tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livar_merge.federated.datasets.formats.folders import archive_folder
from livar_merge.federated.datasets.formats.text import id_table, int_field
from livar_merge.federated.datasets.images import FileImages
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "cub200"


@register_dataset(
    NAME,
    description="Caltech-UCSD Birds-200-2011: 200 bird species, 11,788 RGB images, official split",
    obtain=(
        "download CUB_200_2011.tgz from the Caltech-UCSD Birds-200-2011 project page "
        "(Caltech Vision Lab, archived on CaltechDATA) and extract it into data_root"
    ),
    layout=(
        "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, "
        "classes.txt and images/<path> (data_root = that folder or its parent)"
    ),
)
def _load_cub200(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """CUB-200-2011 with its official train/test split."""
    folder = archive_folder(NAME, root, "CUB_200_2011", "images.txt")
    images = id_table(NAME, folder / "images.txt", "the image list images.txt")
    labels = id_table(NAME, folder / "image_class_labels.txt", "image_class_labels.txt")
    split = id_table(NAME, folder / "train_test_split.txt", "train_test_split.txt")
    class_table = id_table(NAME, folder / "classes.txt", "the class list classes.txt")
    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise dataset_error(
            NAME, f"{folder / 'classes.txt'}: class ids must be 1..{len(class_table)}", hint=False
        )
    classes = [class_table[i][0] for i in range(1, len(class_table) + 1)]
    for table, file_name in ((labels, "image_class_labels.txt"), (split, "train_test_split.txt")):
        missing = sorted(set(images) - set(table))
        if missing:
            raise dataset_error(
                NAME,
                f"{folder / file_name}: no line for image id {missing[0]} (listed in images.txt)",
                hint=False,
            )
    paths: dict[bool, list[Path]] = {True: [], False: []}
    targets: dict[bool, list[int]] = {True: [], False: []}
    for key in sorted(images):
        rel, no = images[key]
        path = folder / "images" / rel
        if not path.is_file():
            raise dataset_error(
                NAME,
                f"{folder / 'images.txt'} line {no}: image id {key}: {path} does not exist.",
                hint=False,
            )
        label = int_field(
            NAME, folder / "image_class_labels.txt", key, labels[key], 1, len(classes)
        )
        is_train = int_field(NAME, folder / "train_test_split.txt", key, split[key], 0, 1) == 1
        paths[is_train].append(path)
        targets[is_train].append(label - 1)
    train, test = (
        FileImages(paths[part], np.asarray(targets[part], dtype=np.int64), classes, image_size)
        for part in (True, False)
    )
    return DatasetSplits(NAME, train, test, classes, 3, str(folder))
