"""``--dataset imagefolder``: any class-folder dataset in torchvision's ``ImageFolder`` layout.

``root/<class>/<image>`` split with a seeded stratified ``test_fraction``, or ``root/train/<class>``
and ``root/test/<class>`` (or ``root/val/<class>``) as given. Classes are the sorted folder names
of the training part (ImageFolder's rule); a test class without a training folder, an empty
class folder and an image PIL cannot decode are refused before training, naming the folder or
file (:func:`~livar_merge.federated.datasets.formats.folders.check_decodable`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livar_merge.federated.datasets.formats.folders import (
    IMAGEFOLDER_SUFFIXES,
    check_decodable,
    class_folders,
    need_root,
)
from livar_merge.federated.datasets.images import FileImages
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.sources.common import split_dataset
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "imagefolder"
TEST_FOLDERS = ("test", "val")


@register_dataset(
    NAME,
    description="your own images in torchvision's ImageFolder layout (one folder per class)",
    obtain="put each class's images in a folder named after the class, under --data-root",
    layout=(
        "data_root/<class>/<image> (a seeded stratified test_fraction is held out), or "
        "data_root/train/<class>/<image> and data_root/test/<class>/<image> (or val/); "
        "images: " + ", ".join(sorted(IMAGEFOLDER_SUFFIXES))
    ),
)
def _load_imagefolder(
    root: Path | None, *, image_size: int | None, seed: int, test_fraction: float = 0.2
) -> DatasetSplits:
    root = need_root(NAME, root)
    train_dir = root / "train"
    test_dir = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if train_dir.is_dir() != (test_dir is not None):
        found = train_dir if train_dir.is_dir() else test_dir
        raise dataset_error(
            NAME, f"found {found} but not its other part (train/ with test/ or val/)."
        )
    if test_dir is None:  # class folders directly under root
        paths, labels, classes = class_folders(NAME, root, IMAGEFOLDER_SUFFIXES)
        check_decodable(NAME, paths)
        full = FileImages(paths, labels, classes, image_size)
        return split_dataset(NAME, full, seed=seed, test_fraction=test_fraction, source=str(root))
    paths, labels, classes = class_folders(NAME, train_dir, IMAGEFOLDER_SUFFIXES)
    test_paths, test_labels, test_classes = class_folders(NAME, test_dir, IMAGEFOLDER_SUFFIXES)
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise dataset_error(
            NAME,
            f"class folder(s) {', '.join(unknown)} of {test_dir} have no folder in {train_dir}: "
            "a test class the clients never train on.",
        )
    index = {name: i for i, name in enumerate(classes)}
    remap = np.asarray([index[name] for name in test_classes], dtype=np.int64)
    check_decodable(NAME, [*paths, *test_paths])
    train = FileImages(paths, labels, classes, image_size)
    test = FileImages(test_paths, remap[test_labels], classes, image_size)
    return DatasetSplits(NAME, train, test, classes, 3, str(root))
