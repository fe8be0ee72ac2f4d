"""Data roots, expected files and class-folder layouts (``<root>/<class>/*.jpg``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from livar_merge.federated.datasets.registry import dataset_error

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# torchvision.datasets.folder.IMG_EXTENSIONS: what an ImageFolder reads
IMAGEFOLDER_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)


def need_root(dataset: str, root: Path | None) -> Path:
    """``root`` if it is an existing folder, else a DatasetError with the layout hint."""
    if root is None:
        raise dataset_error(dataset, "data_root is required (the folder holding the dataset).")
    if not root.is_dir():
        raise dataset_error(dataset, f"data_root {root} does not exist or is not a folder.")
    return root.resolve()


def need_file(dataset: str, path: Path, what: str) -> Path:
    """``path`` if it is a file, else a DatasetError naming it."""
    if not path.is_file():
        raise dataset_error(dataset, f"expected {what} at {path}, which does not exist.")
    return path


def archive_folder(dataset: str, root: Path | None, name: str, marker: str) -> Path:
    """The extracted archive folder ``root/name``, else ``root`` itself if it holds ``marker``."""
    root = need_root(dataset, root)
    folder = root / name
    if folder.is_dir():
        return folder
    if not (root / marker).exists():
        raise dataset_error(dataset, f"found neither {folder}/ nor {root / marker}.")
    return root


def image_files(folder: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Sorted image files (``suffixes``, any case) directly inside ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def class_folders(
    dataset: str, folder: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, labels [N] and class names (sorted sub-folder names) of class folders."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise dataset_error(
            dataset, f"expected class sub-folders of images in {folder}, found none."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, sub in enumerate(subdirs):
        files = image_files(sub, suffixes)
        if not files:
            raise dataset_error(
                dataset, f"class folder {sub} contains no images ({'/'.join(sorted(suffixes))})."
            )
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), [p.name for p in subdirs]


def check_decodable(
    dataset: str, sources: Sequence[Path | bytes], origins: Sequence[str] | None = None
) -> None:
    """Decode every image once (PIL ``load``) and refuse the first that fails, naming it: a
    corrupt file fails here, before any training, not mid-run."""
    import io

    from PIL import Image

    for i, source in enumerate(sources):
        what = origins[i] if origins is not None else str(source)
        try:
            handle = source if isinstance(source, Path) else io.BytesIO(source)
            with Image.open(handle) as im:
                im.load()
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad files
            raise dataset_error(dataset, f"cannot decode image {what}: {exc}", hint=False) from exc
