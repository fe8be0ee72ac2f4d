"""Image-classification datasets for the federated runtime, each read from its standard format.

One registry (:data:`DATASETS`) maps a dataset name to a loader; :func:`load_dataset` returns a
:class:`DatasetSplits` with a train and a test :class:`LabeledImages`. Every item is a
``(uint8 tensor [C, H, W], int label)`` pair. Nothing is ever downloaded: a missing or malformed
dataset raises :class:`DatasetError` naming the file/folder expected, the accepted layout(s) and
how to obtain the data.

Heavy libraries (PIL, pyarrow, scikit-learn) are imported inside the functions that need them.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import io
import math
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from livar_merge.errors import LivarError

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "EncodedImages",
    "FileImages",
    "InMemoryImages",
    "LabeledImages",
    "available_datasets",
    "load_dataset",
    "read_idx",
    "register_dataset",
    "stratified_subsample",
    "subset",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
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


class DatasetError(LivarError):
    """A dataset is unknown, missing, malformed or asked for with bad options."""


# --------------------------------------------------------------------------- image containers


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


def _check_labels(labels: Any, count: int, classes: Sequence[str]) -> np.ndarray:
    """Labels as int64 [count], each in ``[0, len(classes))``."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != count:
        raise DatasetError(f"expected {count} labels in a 1-D array, got shape {arr.shape}")
    if count and not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if count and (arr.min() < 0 or arr.max() >= len(classes)):
        bad = int(np.flatnonzero((arr < 0) | (arr >= len(classes)))[0])
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
        self.labels = _check_labels(labels, images.shape[0], self.classes)
        self.channels = int(images.shape[1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        return self.images[i], int(self.labels[i])


class FileImages(LabeledImages):
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
        self.labels = _check_labels(labels, len(self.paths), self.classes)
        self.image_size = image_size
        self.channels = 3

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        image = decode_image(self.paths[i], str(self.paths[i]))
        if self.image_size is not None:
            image = resize_images(image, self.image_size)
        return image, int(self.labels[i])


class EncodedImages(LabeledImages):
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
        self.labels = _check_labels(labels, len(self.blobs), self.classes)
        self.image_size = image_size
        self.origins = (
            list(origins) if origins is not None else [f"blob {i}" for i in range(len(self.blobs))]
        )
        self.channels = 3

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        image = decode_image(self.blobs[i], self.origins[i])
        if self.image_size is not None:
            image = resize_images(image, self.image_size)
        return image, int(self.labels[i])


class _SubsetImages(LabeledImages):
    """A view of another :class:`LabeledImages` restricted to ``indices`` (fallback of subset)."""

    def __init__(self, base: LabeledImages, indices: np.ndarray) -> None:
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]
        self.classes = list(base.classes)
        self.channels = base.channels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[self._index(index)])]


def _check_indices(indices: Any, n: int) -> np.ndarray:
    """Integer index array [K] with values in ``[0, n)``."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DatasetError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n:
        raise DatasetError(f"indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


def subset(ds: LabeledImages, indices: np.ndarray) -> LabeledImages:
    """The images ``ds[indices]`` (order kept); same classes/channels, same container kind."""
    idx = _check_indices(indices, len(ds))
    if isinstance(ds, InMemoryImages):
        return InMemoryImages(ds.images[torch.from_numpy(idx)], ds.labels[idx], ds.classes)
    if isinstance(ds, FileImages):
        paths = [ds.paths[i] for i in idx]
        return FileImages(paths, ds.labels[idx], ds.classes, ds.image_size)
    if isinstance(ds, EncodedImages):
        blobs = [ds.blobs[i] for i in idx]
        origins = [ds.origins[i] for i in idx]
        return EncodedImages(blobs, ds.labels[idx], ds.classes, ds.image_size, origins)
    return _SubsetImages(ds, idx)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices [n] of a class-proportional sample of ``labels`` [N] (deterministic).

    Class c gets floor or ceil of ``n * count_c / N`` samples (largest-remainder rounding, ties
    to the smaller class id); the members are drawn uniformly with ``default_rng(seed)``.
    """
    labels = np.asarray(labels)
    total = int(labels.shape[0]) if labels.ndim == 1 else -1
    if total < 0:
        raise DatasetError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 <= n <= total:
        raise DatasetError(f"cannot subsample {n} of {total} samples")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    remainder = n - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -(quota - take)))
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False)
        for c, k in enumerate(take)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train indices, test indices) with ``round(N * test_fraction)`` stratified tests."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(labels)
    test = stratified_subsample(labels, round(n * test_fraction), seed)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test


# --------------------------------------------------------------------------- decoding, resizing


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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test images; ``source`` = resolved path, "sklearn" or "generated"."""

    name: str
    train: LabeledImages
    test: LabeledImages
    classes: list[str]
    channels: int
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (labels lie in ``[0, num_classes)``)."""
        return len(self.classes)


Loader = Callable[..., DatasetSplits]


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: the loader, a one-line description, how to obtain it, its layout(s)."""

    name: str
    loader: Loader
    description: str
    obtain: str
    layout: str = ""


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, *, description: str, obtain: str, layout: str = ""
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root: Path | None, *, image_size, seed, **options)``."""

    def decorate(loader: Loader) -> Loader:
        if name in DATASETS:
            raise DatasetError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetInfo(name, loader, description, obtain, layout)
        return loader

    return decorate


def available_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(DATASETS)


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> DatasetSplits:
    """Load dataset ``name`` from ``data_root`` (its standard on-disk format) -> DatasetSplits.

    ``image_size`` resizes every image to image_size x image_size; ``seed`` drives seeded splits
    and generation; ``options`` are dataset-specific (e.g. ``test_fraction``).
    """
    info = DATASETS.get(name)
    if info is None:
        raise DatasetError(
            f"unknown dataset {name!r}; registered datasets: {', '.join(available_datasets())}"
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DatasetError(f"image_size must be a positive int or None, got {image_size!r}")
    accepted = [
        p.name
        for p in inspect.signature(info.loader).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("image_size", "seed")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    root = Path(data_root).expanduser() if data_root is not None else None
    return info.loader(root, image_size=image_size, seed=seed, **options)


# --------------------------------------------------------------------------- error helpers


def _error(dataset: str, problem: str, *, hint: bool = True) -> DatasetError:
    """DatasetError '<dataset>: <problem>' plus the accepted layout(s) and how to obtain it."""
    info = DATASETS.get(dataset)
    message = f"{dataset}: {problem}"
    if hint and info is not None:
        if info.layout:
            message += f" Accepted layout(s): {info.layout}."
        message += f" How to obtain it: {info.obtain}."
    return DatasetError(message)


def _need_root(dataset: str, root: Path | None) -> Path:
    """``root`` if it is an existing folder, else a DatasetError with the layout hint."""
    if root is None:
        raise _error(dataset, "data_root is required (the folder holding the dataset).")
    if not root.is_dir():
        raise _error(dataset, f"data_root {root} does not exist or is not a folder.")
    return root.resolve()


def _need_file(dataset: str, path: Path, what: str) -> Path:
    """``path`` if it is a file, else a DatasetError naming it."""
    if not path.is_file():
        raise _error(dataset, f"expected {what} at {path}, which does not exist.")
    return path


def _text_lines(dataset: str, path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(dataset, f"cannot read {path}: {exc}", hint=False) from exc
    return [(no, line.strip()) for no, line in enumerate(text.splitlines(), 1) if line.strip()]


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files (jpg/jpeg/png, any case) directly inside ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(dataset: str, folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, labels [N] and class names (sorted sub-folder names) of class folders."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise _error(dataset, f"expected class sub-folders of images in {folder}, found none.")
    paths: list[Path] = []
    labels: list[int] = []
    for label, sub in enumerate(subdirs):
        files = _image_files(sub)
        if not files:
            raise _error(dataset, f"class folder {sub} contains no images (.jpg/.jpeg/.png).")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), [p.name for p in subdirs]


def _split_files(
    name: str,
    paths: list[Path],
    labels: np.ndarray,
    classes: list[str],
    *,
    image_size: int | None,
    seed: int,
    test_fraction: float,
    source: Path,
) -> DatasetSplits:
    """A seeded stratified train/test split of a file dataset."""
    try:
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    except DatasetError as exc:
        raise _error(name, str(exc), hint=False) from exc
    full = FileImages(paths, labels, classes, image_size)
    return DatasetSplits(
        name, subset(full, train_idx), subset(full, test_idx), classes, 3, str(source)
    )


def _in_memory_splits(
    name: str,
    images: torch.Tensor,
    labels: np.ndarray,
    classes: list[str],
    *,
    image_size: int | None,
    seed: int,
    test_fraction: float,
    source: str,
) -> DatasetSplits:
    """A seeded stratified train/test split of uint8 images [N, C, H, W] (resized once)."""
    if image_size is not None:
        images = resize_images(images, image_size)
    try:
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    except DatasetError as exc:
        raise _error(name, str(exc), hint=False) from exc
    full = InMemoryImages(images, labels, classes)
    return DatasetSplits(
        name, subset(full, train_idx), subset(full, test_idx), classes, full.channels, source
    )


# --------------------------------------------------------------------------- tiny-imagenet

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
    "tiny-imagenet",
    description="Tiny ImageNet: 200 classes, 64x64 RGB, 100k train / 10k val (val used as test)",
    obtain=_TINY_OBTAIN,
    layout=_TINY_LAYOUT,
)
def _load_tiny_imagenet(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """Tiny ImageNet in the original folder layout or the parquet layout."""
    root = _need_root("tiny-imagenet", root)
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
    raise _error(
        "tiny-imagenet",
        f"found neither {root / 'tiny-imagenet-200' / 'wnids.txt'} (or {root / 'wnids.txt'}) "
        f"nor {root / 'data' / 'train-*.parquet'}.",
    )


def _read_wnids(dataset: str, path: Path) -> list[str]:
    """The wnids of ``wnids.txt`` (one a line), rejecting duplicates and blanks-with-spaces."""
    wnids: list[str] = []
    seen: dict[str, int] = {}
    for no, line in _text_lines(dataset, path):
        if len(line.split()) != 1:
            raise _error(dataset, f"{path} line {no}: expected one wnid, got {line!r}", hint=False)
        if line in seen:
            raise _error(
                dataset,
                f"{path} line {no}: wnid {line} repeats line {seen[line]}",
                hint=False,
            )
        seen[line] = no
        wnids.append(line)
    if not wnids:
        raise _error(dataset, f"{path} lists no wnids.", hint=False)
    return wnids


def _tiny_folder(folder: Path, image_size: int | None) -> DatasetSplits:
    """Tiny ImageNet original layout (``folder`` = tiny-imagenet-200)."""
    name = "tiny-imagenet"
    wnids = _read_wnids(name, _need_file(name, folder / "wnids.txt", "the class list wnids.txt"))
    index = {w: i for i, w in enumerate(wnids)}
    classes = list(wnids)
    words = folder / "words.txt"
    if words.is_file():
        for no, line in _text_lines(name, words):
            wnid, _, text = line.partition("\t")
            if not text.strip():
                raise _error(name, f"{words} line {no}: expected 'wnid<TAB>names'", hint=False)
            if wnid.strip() in index:
                classes[index[wnid.strip()]] = text.strip()
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise _error(name, f"expected the training images of {wnid} in {images_dir}/.")
        files = _image_files(images_dir)
        if not files:
            raise _error(name, f"class folder {images_dir} contains no images.", hint=False)
        train_paths += files
        train_labels += [label] * len(files)
    annotations = _need_file(
        name, folder / "val" / "val_annotations.txt", "the validation labels val_annotations.txt"
    )
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for no, line in _text_lines(name, annotations):
        fields = line.split("\t")
        if len(fields) < 2:
            raise _error(
                name,
                f"{annotations} line {no}: expected tab-separated 'file wnid x y w h', "
                f"got {line!r}",
                hint=False,
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise _error(
                name,
                f"{annotations} line {no}: wnid {wnid!r} is not listed in {folder / 'wnids.txt'}",
                hint=False,
            )
        path = folder / "val" / "images" / file_name
        if not path.is_file():
            raise _error(name, f"{annotations} line {no}: image {path} does not exist.", hint=False)
        val_paths.append(path)
        val_labels.append(index[wnid])
    if not val_paths:
        raise _error(name, f"{annotations} lists no validation images.", hint=False)
    train = FileImages(train_paths, np.asarray(train_labels), classes, image_size)
    test = FileImages(val_paths, np.asarray(val_labels), classes, image_size)
    return DatasetSplits(name, train, test, classes, 3, str(folder))


def _tiny_parquet_part(
    files: list[Path], num_classes: int | None
) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Image bytes, labels [N] and origins ('file row i') of parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = "tiny-imagenet"
    blobs: list[bytes] = []
    labels: list[np.ndarray] = []
    origins: list[str] = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise _error(name, f"cannot read parquet file {path}: {exc}", hint=False) from exc
        missing = {"image", "label"} - set(table.column_names)
        if missing:
            raise _error(
                name,
                f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                f"found {', '.join(table.column_names)}",
            )
        image_type = table.schema.field("image").type
        if not pa.types.is_struct(image_type) or image_type.get_field_index("bytes") < 0:
            raise _error(
                name, f"{path}: column image must be a struct with a bytes field, is {image_type}"
            )
        if not pa.types.is_integer(table.schema.field("label").type):
            raise _error(
                name, f"{path}: column label must be integer, is {table.schema.field('label').type}"
            )
        column = table.column("image").combine_chunks().field("bytes").to_pylist()
        label = table.column("label").to_numpy(zero_copy_only=False)
        for row, blob in enumerate(column):
            if blob is None:
                raise _error(name, f"{path} row {row}: field image.bytes is null", hint=False)
        if table.column("label").null_count:
            raise _error(name, f"{path}: column label holds nulls", hint=False)
        label = label.astype(np.int64)
        if num_classes is not None and len(label):
            bad = np.flatnonzero((label < 0) | (label >= num_classes))
            if len(bad):
                raise _error(
                    name,
                    f"{path} row {int(bad[0])}: field label = {int(label[bad[0]])} is outside "
                    f"[0, {num_classes})",
                    hint=False,
                )
        blobs += column
        labels.append(label)
        origins += [f"{path} row {row}" for row in range(len(column))]
    return blobs, np.concatenate(labels), origins


def _tiny_parquet(data: Path, root: Path, image_size: int | None) -> DatasetSplits:
    """Tiny ImageNet parquet layout (``data`` holds train-*.parquet and valid-*.parquet)."""
    name = "tiny-imagenet"
    train_files = sorted(data.glob("train-*.parquet"))
    valid_files = sorted(data.glob("valid-*.parquet")) or sorted(data.glob("validation-*.parquet"))
    if not valid_files:
        raise _error(name, f"expected validation shards {data / 'valid-*.parquet'}, found none.")
    classes: list[str] | None = None
    for folder in dict.fromkeys((root, data, data.parent)):
        for file_name in ("wnids.txt", "classes.txt"):
            if classes is None and (folder / file_name).is_file():
                classes = _read_wnids(name, folder / file_name)
    num_classes = len(classes) if classes is not None else None
    train_blobs, train_labels, train_origins = _tiny_parquet_part(train_files, num_classes)
    val_blobs, val_labels, val_origins = _tiny_parquet_part(valid_files, num_classes)
    if classes is None:
        both = np.concatenate([train_labels, val_labels])
        if len(both) and both.min() < 0:
            raise _error(name, f"negative label {int(both.min())} in {data}", hint=False)
        classes = [str(i) for i in range(int(both.max()) + 1 if len(both) else 0)]
    train = EncodedImages(train_blobs, train_labels, classes, image_size, train_origins)
    test = EncodedImages(val_blobs, val_labels, classes, image_size, val_origins)
    return DatasetSplits(name, train, test, classes, 3, str(data))


# --------------------------------------------------------------------------- cifar100


def _numpy_global(module: str, name: str) -> Any:
    """A numpy global, mapping numpy.core <-> numpy._core to whichever this numpy has."""
    if importlib.util.find_spec("numpy._core") is not None:
        module = module.replace("numpy.core.", "numpy._core.")
    else:  # pragma: no cover - numpy < 2
        module = module.replace("numpy._core.", "numpy.core.")
    return getattr(importlib.import_module(module), name)


_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes objects in protocol-2 pickles written by Python 3
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array-reconstruction globals; refuses the rest."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 str/array data of CIFAR
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise DatasetError(
                f"cifar100: refusing to unpickle {self._path}: it references the global "
                f"{module}.{name}, which is not a numpy array-reconstruction global "
                "(a CIFAR pickle holds only dicts, lists and numpy arrays)"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        return _numpy_global(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR python batch: dict with keys normalised to str (bytes keys decoded)."""
    _need_file("cifar100", path, f"the CIFAR-100 python batch {path.name}")
    try:
        with path.open("rb") as handle:
            obj = _RestrictedUnpickler(handle, path).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise _error("cifar100", f"{path} is not a readable pickle: {exc}", hint=False) from exc
    if not isinstance(obj, dict):
        raise _error(
            "cifar100", f"{path} holds a {type(obj).__name__}, expected a dict", hint=False
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and fine labels [N] of one CIFAR-100 batch."""
    batch = _load_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in batch:
            raise _error(
                "cifar100",
                f"{path}: missing key b{key!r}; has {sorted(batch)}",
                hint=False,
            )
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _error(
            "cifar100",
            f"{path}: field b'data' must be uint8 [N, 3072], is {data.dtype} {data.shape}",
            hint=False,
        )
    labels = np.asarray(batch["fine_labels"])
    if labels.shape != (data.shape[0],) or (
        labels.size and not np.issubdtype(labels.dtype, np.integer)
    ):
        raise _error(
            "cifar100",
            f"{path}: field b'fine_labels' must hold {data.shape[0]} ints, "
            f"is {labels.dtype} {labels.shape}",
            hint=False,
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise _error(
            "cifar100",
            f"{path}: field b'fine_labels'[{int(bad[0])}] = {int(labels[bad[0]])} is outside "
            f"[0, {num_classes})",
            hint=False,
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, labels.astype(np.int64)


@register_dataset(
    "cifar100",
    description="CIFAR-100: 100 classes, 32x32 RGB, 50k train / 10k test",
    obtain=(
        "download the CIFAR-100 python version, cifar-100-python.tar.gz, from Alex Krizhevsky's "
        "CIFAR page (University of Toronto) and extract it into data_root"
    ),
    layout="cifar-100-python/{train,test,meta} (data_root = that folder or its parent)",
)
def _load_cifar100(root: Path | None, *, image_size: int | None, seed: int) -> DatasetSplits:
    """CIFAR-100 python pickle batches (fine labels)."""
    root = _need_root("cifar100", root)
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    if not (folder / "meta").exists() and folder == root:
        raise _error("cifar100", f"found neither {root / 'cifar-100-python'}/ nor {root / 'meta'}.")
    meta = _load_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise _error("cifar100", f"{folder / 'meta'}: missing key b'fine_label_names'", hint=False)
    classes = [
        n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]
    ]
    train_images, train_labels = _cifar_batch(folder / "train", len(classes))
    test_images, test_labels = _cifar_batch(folder / "test", len(classes))
    if image_size is not None:
        train_images = resize_images(train_images, image_size)
        test_images = resize_images(test_images, image_size)
    train = InMemoryImages(train_images, train_labels, classes)
    test = InMemoryImages(test_images, test_labels, classes)
    return DatasetSplits("cifar100", train, test, classes, 3, str(folder))


# --------------------------------------------------------------------------- imagenet-r, eurosat


@register_dataset(
    "imagenet-r",
    description="ImageNet-R(endition): 200 ImageNet classes as art/cartoons/etc., ~30k RGB images",
    obtain=(
        "download imagenet-r.tar, released with 'The Many Faces of Robustness' (Hendrycks et al., "
        "GitHub project hendrycks/imagenet-r), and extract it into data_root"
    ),
    layout="imagenet-r/<wnid>/*.jpg class folders (data_root = imagenet-r/ or its parent)",
)
def _load_imagenet_r(
    root: Path | None, *, image_size: int | None, seed: int, test_fraction: float = 0.2
) -> DatasetSplits:
    """ImageNet-R class folders; seeded stratified train/test split."""
    return _class_folder_splits(
        "imagenet-r",
        root,
        ("imagenet-r",),
        image_size=image_size,
        seed=seed,
        test_fraction=test_fraction,
    )


@register_dataset(
    "eurosat",
    description="EuroSAT RGB: 10 land-use classes, 64x64 Sentinel-2 RGB, 27k images",
    obtain=(
        "download EuroSAT_RGB.zip from the EuroSAT project (Helber et al., files hosted on "
        "Zenodo) and unzip it into data_root"
    ),
    layout=(
        "EuroSAT_RGB/<Class>/*.jpg or 2750/<Class>/*.jpg (data_root = that folder or its parent)"
    ),
)
def _load_eurosat(
    root: Path | None, *, image_size: int | None, seed: int, test_fraction: float = 0.2
) -> DatasetSplits:
    """EuroSAT RGB class folders; seeded stratified train/test split."""
    return _class_folder_splits(
        "eurosat",
        root,
        ("EuroSAT_RGB", "2750"),
        image_size=image_size,
        seed=seed,
        test_fraction=test_fraction,
    )


def _class_folder_splits(
    dataset: str,
    root: Path | None,
    subfolders: tuple[str, ...],
    *,
    image_size: int | None,
    seed: int,
    test_fraction: float,
) -> DatasetSplits:
    """A class-folder dataset in ``root/<one of subfolders>`` or ``root`` itself, split with a
    seeded stratified ``test_fraction``."""
    root = _need_root(dataset, root)
    folder = next((root / sub for sub in subfolders if (root / sub).is_dir()), root)
    paths, labels, classes = _class_folders(dataset, folder)
    return _split_files(
        dataset,
        paths,
        labels,
        classes,
        image_size=image_size,
        seed=seed,
        test_fraction=test_fraction,
        source=folder,
    )


# --------------------------------------------------------------------------- cub200


def _id_table(dataset: str, path: Path, what: str) -> dict[int, tuple[str, int]]:
    """``id value`` lines of a CUB metadata file -> {id: (value, line number)}."""
    _need_file(dataset, path, what)
    table: dict[int, tuple[str, int]] = {}
    for no, line in _text_lines(dataset, path):
        key, _, value = line.partition(" ")
        if not key.isdigit() or not value.strip():
            raise _error(
                dataset, f"{path} line {no}: expected '<id> <value>', got {line!r}", hint=False
            )
        if int(key) in table:
            raise _error(dataset, f"{path} line {no}: id {key} appears twice", hint=False)
        table[int(key)] = (value.strip(), no)
    return table


def _int_field(
    dataset: str, path: Path, key: int, entry: tuple[str, int], low: int, high: int
) -> int:
    """The value of ``entry`` as an int in [low, high], else an error naming file and line."""
    value, no = entry
    if not value.isdigit() or not low <= int(value) <= high:
        raise _error(
            dataset,
            f"{path} line {no}: image id {key} has value {value!r}, expected an integer in "
            f"[{low}, {high}]",
            hint=False,
        )
    return int(value)


@register_dataset(
    "cub200",
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
    name = "cub200"
    root = _need_root(name, root)
    folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    if not (folder / "images.txt").exists() and folder == root:
        raise _error(name, f"found neither {root / 'CUB_200_2011'}/ nor {root / 'images.txt'}.")
    images = _id_table(name, folder / "images.txt", "the image list images.txt")
    labels = _id_table(name, folder / "image_class_labels.txt", "image_class_labels.txt")
    split = _id_table(name, folder / "train_test_split.txt", "train_test_split.txt")
    class_table = _id_table(name, folder / "classes.txt", "the class list classes.txt")
    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise _error(
            name, f"{folder / 'classes.txt'}: class ids must be 1..{len(class_table)}", hint=False
        )
    classes = [class_table[i][0] for i in range(1, len(class_table) + 1)]
    for table, file_name in ((labels, "image_class_labels.txt"), (split, "train_test_split.txt")):
        missing = sorted(set(images) - set(table))
        if missing:
            raise _error(
                name,
                f"{folder / file_name}: no line for image id {missing[0]} (listed in images.txt)",
                hint=False,
            )
    paths: dict[bool, list[Path]] = {True: [], False: []}
    targets: dict[bool, list[int]] = {True: [], False: []}
    for key in sorted(images):
        rel, no = images[key]
        path = folder / "images" / rel
        if not path.is_file():
            raise _error(
                name,
                f"{folder / 'images.txt'} line {no}: image id {key}: {path} does not exist.",
                hint=False,
            )
        label = _int_field(
            name, folder / "image_class_labels.txt", key, labels[key], 1, len(classes)
        )
        is_train = _int_field(name, folder / "train_test_split.txt", key, split[key], 0, 1) == 1
        paths[is_train].append(path)
        targets[is_train].append(label - 1)
    train = FileImages(paths[True], np.asarray(targets[True], dtype=np.int64), classes, image_size)
    test = FileImages(paths[False], np.asarray(targets[False], dtype=np.int64), classes, image_size)
    return DatasetSplits(name, train, test, classes, 3, str(folder))


# --------------------------------------------------------------------------- digits


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
    labels = np.asarray(bunch.target, dtype=np.int64)
    classes = [str(i) for i in range(10)]
    return _in_memory_splits(
        "digits",
        images,
        labels,
        classes,
        image_size=image_size,
        seed=seed,
        test_fraction=test_fraction,
        source="sklearn",
    )


# --------------------------------------------------------------------------- fashion-mnist

_IDX_MAGIC = {3: 2051, 1: 2049}  # ubyte (0x08) files: images idx3, labels idx1


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped if they start with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data: {exc}") from exc
    if path.suffix == ".gz":
        raise DatasetError(f"{path}: named .gz but is not gzip data")
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx ubyte file (raw or gzip) -> uint8 array of its dims; header fully validated.

    Header: two zero bytes, type code 0x08 (ubyte), ndim, then ndim big-endian uint32 dims.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated idx header ({len(raw)} bytes, need at least 4)")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = _IDX_MAGIC.get(ndim, 0x0800 + ndim)
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: bad idx magic number {magic} (0x{magic:08x}) in bytes 0-3; expected "
            f"{expected_magic} (0x{expected_magic:08x}: ubyte data with {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path}: truncated idx header ({len(raw)} bytes, need {header} for {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if any(d == 0 for d in dims[1:]):
        raise DatasetError(f"{path}: idx header dims {dims} contain a zero item dimension")
    expected = math.prod(dims)
    body = len(raw) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {kind}: header dims {dims} need {expected} data bytes after the "
            f"{header}-byte header, file has {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _idx_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` or ``folder/base.gz``, whichever exists (raw first)."""
    return next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)


def _fashion_split(folder: Path, prefix: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 [N, 1, H, W] and labels [N] of the ``train`` or ``t10k`` idx pair."""
    name = "fashion-mnist"
    found = {}
    for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        base = f"{prefix}-{kind}"
        path = _idx_file(folder, base)
        if path is None:
            raise _error(name, f"expected {folder / base} or {folder / base}.gz, neither exists.")
        try:
            found[ndim] = (path, read_idx(path, ndim))
        except DatasetError as exc:
            raise _error(name, str(exc), hint=False) from exc
    (image_path, images), (label_path, labels) = found[3], found[1]
    if images.shape[0] != labels.shape[0]:
        raise _error(
            name,
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels",
            hint=False,
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        bad = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
        raise _error(
            name,
            f"{label_path}: label {int(labels[bad])} at item {bad} is outside [0, 10)",
            hint=False,
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64)


@register_dataset(
    "fashion-mnist",
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
    name = "fashion-mnist"
    root = _need_root(name, root if root is not None else FASHION_MNIST_DEFAULT_ROOT)
    candidates = (root, root / "fashion-mnist", root / "FashionMNIST" / "raw")
    folder = next(
        (f for f in candidates if _idx_file(f, "train-images-idx3-ubyte") is not None), root
    )
    train_images, train_labels = _fashion_split(folder, "train")
    test_images, test_labels = _fashion_split(folder, "t10k")
    if image_size is not None:
        train_images = resize_images(train_images, image_size)
        test_images = resize_images(test_images, image_size)
    classes = list(FASHION_MNIST_CLASSES)
    train = InMemoryImages(train_images, train_labels, classes)
    test = InMemoryImages(test_images, test_labels, classes)
    return DatasetSplits(name, train, test, classes, 1, str(folder))


# --------------------------------------------------------------------------- synthetic


def synthetic_images(
    labels: np.ndarray, templates: np.ndarray, rng: np.random.Generator, noise: float, shift: int
) -> np.ndarray:
    """uint8 [N, C, S, S]: templates [K, C, S, S] of ``labels``, rolled by <= shift px, + noise."""
    n, size = labels.shape[0], templates.shape[-1]
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
