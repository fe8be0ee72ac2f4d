"""The dataset registry: :func:`register_dataset`, :func:`load_dataset` and the error helper.

:data:`DATASETS` maps a dataset name to its :class:`DatasetInfo` (loader, description, how to
obtain it, accepted layout); the loaders register themselves from the ``sources`` modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.splits import DatasetSplits

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
    accepted = loader_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    root = Path(data_root).expanduser() if data_root is not None else None
    return info.loader(root, image_size=image_size, seed=seed, **options)


def loader_options(name: str) -> list[str]:
    """The dataset-specific options the loader of ``name`` accepts (``test_fraction``, ...)."""
    info = DATASETS.get(name)
    if info is None:
        return []
    return [
        p.name
        for p in inspect.signature(info.loader).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("image_size", "seed")
    ]


def dataset_error(dataset: str, problem: str, *, hint: bool = True) -> DatasetError:
    """DatasetError '<dataset>: <problem>' plus the accepted layout(s) and how to obtain it."""
    info = DATASETS.get(dataset)
    message = f"{dataset}: {problem}"
    if hint and info is not None:
        if info.layout:
            message += f" Accepted layout(s): {info.layout}."
        message += f" How to obtain it: {info.obtain}."
    return DatasetError(message)
