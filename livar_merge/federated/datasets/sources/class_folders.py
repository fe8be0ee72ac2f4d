"""Class-folder datasets (``<Class>/*.jpg``) split with a seeded stratified test fraction:
ImageNet-R and EuroSAT RGB."""

from __future__ import annotations

from pathlib import Path

from livar_merge.federated.datasets.formats.folders import class_folders, need_root
from livar_merge.federated.datasets.images import FileImages
from livar_merge.federated.datasets.registry import Loader, register_dataset
from livar_merge.federated.datasets.sources.common import split_dataset
from livar_merge.federated.datasets.splits import DatasetSplits


def register_class_folder_dataset(
    name: str, subfolders: tuple[str, ...], *, description: str, obtain: str, layout: str
) -> Loader:
    """Register and return the loader of class folders in ``root/<one of subfolders>`` or
    ``root`` itself, split with a seeded stratified ``test_fraction`` (default 0.2)."""

    def load(
        root: Path | None, *, image_size: int | None, seed: int, test_fraction: float = 0.2
    ) -> DatasetSplits:
        root = need_root(name, root)
        folder = next((root / sub for sub in subfolders if (root / sub).is_dir()), root)
        paths, labels, classes = class_folders(name, folder)
        full = FileImages(paths, labels, classes, image_size)
        return split_dataset(name, full, seed=seed, test_fraction=test_fraction, source=str(folder))

    load.__doc__ = f"{name} class folders; seeded stratified train/test split."
    return register_dataset(name, description=description, obtain=obtain, layout=layout)(load)


_load_imagenet_r = register_class_folder_dataset(
    "imagenet-r",
    ("imagenet-r",),
    description="ImageNet-R(endition): 200 ImageNet classes as art/cartoons/etc., ~30k RGB images",
    obtain=(
        "download imagenet-r.tar, released with 'The Many Faces of Robustness' (Hendrycks et al., "
        "GitHub project hendrycks/imagenet-r), and extract it into data_root"
    ),
    layout="imagenet-r/<wnid>/*.jpg class folders (data_root = imagenet-r/ or its parent)",
)

_load_eurosat = register_class_folder_dataset(
    "eurosat",
    ("EuroSAT_RGB", "2750"),
    description="EuroSAT RGB: 10 land-use classes, 64x64 Sentinel-2 RGB, 27k images",
    obtain=(
        "download EuroSAT_RGB.zip from the EuroSAT project (Helber et al., files hosted on "
        "Zenodo) and unzip it into data_root"
    ),
    layout=(
        "EuroSAT_RGB/<Class>/*.jpg or 2750/<Class>/*.jpg (data_root = that folder or its parent)"
    ),
)
