"""Tiny ImageNet: the original archive's folder layout or the parquet copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livar_merge.federated.datasets.formats.folders import image_files, need_file, need_root
from livar_merge.federated.datasets.formats.parquet import read_image_shards
from livar_merge.federated.datasets.formats.text import read_wnids, text_lines
from livar_merge.federated.datasets.images import EncodedImages, FileImages
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "tiny-imagenet"

_TINY_OBTAIN = (
    "download the Tiny ImageNet archive tiny-imagenet-200.zip from the CS231n course site "
    "(Stanford) and unzip it into data_root, or the parquet copy of Tiny ImageNet from the "
    "Hugging Face hub (dataset zh-plus/tiny-imagenet) and point data_root at the folder holding "
    "its data/ folder"
)
_TINY_LAYOUT = (
    "(a) tiny-imagenet-200/ (data_root = it or its parent) with wnids.txt, optional words.txt, "
    "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt; "
    "(b) data/train-*.parquet and data/valid-*.parquet with columns image (struct of bytes, path) "
    "and label (int), optionally a wnids.txt or classes.txt beside data/"
)


@register_dataset(
    NAME,
    description="Tiny ImageNet: 200 classes, 64x64 RGB, 100k train / 10k val (val used as test)",
    obtain=_TINY_OBTAIN,
    layout=_TINY_LAYOUT,
)
def _load_tiny_imagenet(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """Tiny ImageNet in the original folder layout or the parquet layout."""
    root = need_root(NAME, root)
    folders = (root, root / "tiny-imagenet-200")
    for folder in folders:
        if (folder / "train").is_dir():
            return _tiny_folder(folder, image_size)
    for folder in (root / "data", root):
        if sorted(folder.glob("train-*.parquet")):
            return _tiny_parquet(folder, root, image_size)
    for folder in folders:
        if (folder / "wnids.txt").is_file():  # folder layout without train/: say what is missing
            return _tiny_folder(folder, image_size)
    raise dataset_error(
        NAME,
        f"found neither {root / 'tiny-imagenet-200' / 'wnids.txt'} (or {root / 'wnids.txt'}) "
        f"nor {root / 'data' / 'train-*.parquet'}.",
    )


def _class_names(folder: Path, wnids: list[str]) -> list[str]:
    """Class names: the words.txt entry of each wnid where there is one, else the wnid."""
    index = {w: i for i, w in enumerate(wnids)}
    classes = list(wnids)
    words = folder / "words.txt"
    if words.is_file():
        for no, line in text_lines(NAME, words):
            wnid, _, text = line.partition("\t")
            if not text.strip():
                raise dataset_error(
                    NAME, f"{words} line {no}: expected 'wnid<TAB>names'", hint=False
                )
            if wnid.strip() in index:
                classes[index[wnid.strip()]] = text.strip()
    return classes


def _train_images(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Paths and labels of ``train/<wnid>/images/*`` in wnids order."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise dataset_error(NAME, f"expected the training images of {wnid} in {images_dir}/.")
        files = image_files(images_dir)
        if not files:
            raise dataset_error(NAME, f"class folder {images_dir} contains no images.", hint=False)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _val_images(folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """Paths and labels of the validation images listed in ``val/val_annotations.txt``."""
    annotations = need_file(
        NAME, folder / "val" / "val_annotations.txt", "the validation labels val_annotations.txt"
    )
    paths: list[Path] = []
    labels: list[int] = []
    for no, line in text_lines(NAME, annotations):
        fields = line.split("\t")
        if len(fields) < 2:
            raise dataset_error(
                NAME,
                f"{annotations} line {no}: expected tab-separated 'file wnid x y w h', "
                f"got {line!r}",
                hint=False,
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise dataset_error(
                NAME,
                f"{annotations} line {no}: wnid {wnid!r} is not listed in {folder / 'wnids.txt'}",
                hint=False,
            )
        path = folder / "val" / "images" / file_name
        if not path.is_file():
            raise dataset_error(
                NAME, f"{annotations} line {no}: image {path} does not exist.", hint=False
            )
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise dataset_error(NAME, f"{annotations} lists no validation images.", hint=False)
    return paths, labels


def _tiny_folder(folder: Path, image_size: int | None) -> DatasetSplits:
    """Tiny ImageNet original layout (``folder`` = tiny-imagenet-200)."""
    wnids = read_wnids(NAME, need_file(NAME, folder / "wnids.txt", "the class list wnids.txt"))
    classes = _class_names(folder, wnids)
    train_paths, train_labels = _train_images(folder, wnids)
    val_paths, val_labels = _val_images(folder, {w: i for i, w in enumerate(wnids)})
    train = FileImages(train_paths, np.asarray(train_labels), classes, image_size)
    test = FileImages(val_paths, np.asarray(val_labels), classes, image_size)
    return DatasetSplits(NAME, train, test, classes, 3, str(folder))


def _tiny_parquet(data: Path, root: Path, image_size: int | None) -> DatasetSplits:
    """Tiny ImageNet parquet layout (``data`` holds train-*.parquet and valid-*.parquet)."""
    train_files = sorted(data.glob("train-*.parquet"))
    valid_files = sorted(data.glob("valid-*.parquet")) or sorted(data.glob("validation-*.parquet"))
    if not valid_files:
        raise dataset_error(
            NAME, f"expected validation shards {data / 'valid-*.parquet'}, found none."
        )
    classes: list[str] | None = None
    for folder in dict.fromkeys((root, data, data.parent)):
        for file_name in ("wnids.txt", "classes.txt"):
            if classes is None and (folder / file_name).is_file():
                classes = read_wnids(NAME, folder / file_name)
    num_classes = len(classes) if classes is not None else None
    train_blobs, train_labels, train_origins = read_image_shards(NAME, train_files, num_classes)
    val_blobs, val_labels, val_origins = read_image_shards(NAME, valid_files, num_classes)
    if classes is None:
        both = np.concatenate([train_labels, val_labels])
        if len(both) and both.min() < 0:
            raise dataset_error(NAME, f"negative label {int(both.min())} in {data}", hint=False)
        classes = [str(i) for i in range(int(both.max()) + 1 if len(both) else 0)]
    train = EncodedImages(train_blobs, train_labels, classes, image_size, train_origins)
    test = EncodedImages(val_blobs, val_labels, classes, image_size, val_origins)
    return DatasetSplits(NAME, train, test, classes, 3, str(data))
