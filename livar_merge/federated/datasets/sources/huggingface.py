"""``--dataset hf``: a Hugging Face ``datasets`` dataset on disk.

``data_root`` is either a folder written by ``save_to_disk`` (a ``DatasetDict`` with ``train``
and ``test``/``validation`` splits, or one ``Dataset`` split with a seeded stratified
``test_fraction``), or a folder of parquet or Arrow files (the Hub's
``data/train-00000-of-00001.parquet`` layout: a file whose name starts with ``train`` is
training data, ``test``/``validation``/``val`` test data; one group alone is split). The images
are the column ``image_column`` (the ``Image`` feature: encoded bytes, or a file path), the
labels the integer (or ``ClassLabel``) column ``label_column``; class names come from the
``ClassLabel`` when there is one. The images are read as stored (Arrow, no decoding pass of
``datasets``) and decoded with PIL when used; every one is decoded once before training, so a
corrupt image is refused naming its file and row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from livar_merge.federated.datasets.formats.folders import check_decodable, need_root
from livar_merge.federated.datasets.images import EncodedImages
from livar_merge.federated.datasets.registry import dataset_error, register_dataset
from livar_merge.federated.datasets.sources.common import split_dataset
from livar_merge.federated.datasets.splits import DatasetSplits

NAME = "hf"
TEST_SPLITS = ("test", "validation", "val")


@register_dataset(
    NAME,
    description="a Hugging Face datasets folder (save_to_disk) or parquet/Arrow files",
    obtain=(
        "datasets.load_dataset(<name>).save_to_disk(<folder>) where the Hub can be reached, "
        "or the dataset repository's parquet files"
    ),
    layout=(
        "data_root written by save_to_disk (DatasetDict train + test/validation, or one "
        "split), or data_root/**/{train,test,validation}*.{parquet,arrow}; columns named by "
        "image_column (Image feature) and label_column (integer or ClassLabel)"
    ),
)
def _load_hf(
    root: Path | None,
    *,
    image_size: int | None,
    seed: int,
    test_fraction: float = 0.2,
    image_column: str = "image",
    label_column: str = "label",
) -> DatasetSplits:
    root = need_root(NAME, root)
    columns = (image_column, label_column)
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        parts = _saved_splits(root)
    else:
        parts = _file_splits(root)
    read = {split: _read_table(table, origin, columns) for split, (table, origin) in parts.items()}
    names = next((n for t, _ in parts.values() if (n := _class_names(t, label_column))), None)
    classes = _classes(read, label_column, names)
    images = {}
    for split, (blobs, labels, origins) in read.items():
        check_decodable(NAME, blobs, origins)
        images[split] = EncodedImages(blobs, labels, classes, image_size, origins)
    if "train" in images and "test" in images:
        return DatasetSplits(NAME, images["train"], images["test"], classes, 3, str(root))
    (only,) = images.values()
    return split_dataset(NAME, only, seed=seed, test_fraction=test_fraction, source=str(root))


def _saved_splits(root: Path) -> dict[str, tuple[Any, str]]:
    """``{"train"|"test"|"all": (pyarrow table, origin)}`` of a ``save_to_disk`` folder."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(root))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise dataset_error(NAME, f"cannot read the save_to_disk folder {root}: {exc}") from exc
    if isinstance(saved, datasets.Dataset):
        return {"all": (saved.flatten_indices().data.table, str(root))}
    names = list(saved)
    test = next((s for s in TEST_SPLITS if s in names), None)
    if "train" not in names or test is None:
        if len(names) != 1:
            raise dataset_error(
                NAME, f"{root} holds splits {names}: expected train and test (or validation)."
            )
        return {"all": (saved[names[0]].flatten_indices().data.table, f"{root}/{names[0]}")}
    return {
        split: (saved[name].flatten_indices().data.table, f"{root}/{name}")
        for split, name in (("train", "train"), ("test", test))
    }


def _file_splits(root: Path) -> dict[str, tuple[Any, str]]:
    """Parquet or Arrow files under ``root`` grouped into train/test by their names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted([*root.rglob("*.parquet"), *root.rglob("*.arrow")])
    if not files:
        raise dataset_error(
            NAME, f"found neither a save_to_disk folder nor parquet/arrow files in {root}."
        )
    groups: dict[str, list[Path]] = {"train": [], "test": [], "all": []}
    for path in files:
        stem = path.name.lower()
        if stem.startswith("train"):
            groups["train"].append(path)
        elif stem.startswith(TEST_SPLITS):
            groups["test"].append(path)
        else:
            groups["all"].append(path)
    if groups["train"] and groups["test"]:
        if groups["all"]:
            raise dataset_error(
                NAME, f"{groups['all'][0]} is neither train nor test data (its name)."
            )
        chosen = {"train": groups["train"], "test": groups["test"]}
    elif sum(bool(g) for g in groups.values()) == 1:
        chosen = {"all": next(g for g in groups.values() if g)}
    else:
        raise dataset_error(NAME, f"{root}: training files without test files or the reverse.")
    out = {}
    for split, paths in chosen.items():
        tables = []
        for path in paths:
            try:
                if path.suffix == ".parquet":
                    tables.append(pq.read_table(path))
                else:
                    tables.append(_read_arrow(path))
            except (OSError, pa.ArrowException) as exc:
                raise dataset_error(NAME, f"cannot read {path}: {exc}", hint=False) from exc
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowException as exc:
            raise dataset_error(NAME, f"the {split} files have different columns: {exc}") from exc
        out[split] = (table, ", ".join(str(p) for p in paths))
    return out


def _read_arrow(path: Path) -> Any:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()  # what datasets writes
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _read_table(
    table: Any, origin: str, columns: tuple[str, str]
) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Image bytes, labels [N] and row origins of ``table`` (checked column by column)."""
    import pyarrow as pa

    image_column, label_column = columns
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise dataset_error(
            NAME,
            f"{origin}: no column {', '.join(repr(c) for c in missing)} (image_column/"
            f"label_column); columns: {', '.join(table.column_names)}",
            hint=False,
        )
    label_type = table.schema.field(label_column).type
    if not pa.types.is_integer(label_type):
        raise dataset_error(
            NAME,
            f"{origin}: label column {label_column!r} is {label_type}, not integer class ids "
            "(an int or ClassLabel feature)",
            hint=False,
        )
    if table.column(label_column).null_count:
        raise dataset_error(
            NAME, f"{origin}: label column {label_column!r} holds nulls", hint=False
        )
    image_type = table.schema.field(image_column).type
    if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
        raise dataset_error(
            NAME,
            f"{origin}: image column {image_column!r} is {image_type}, not the Image feature "
            "(a struct of bytes and path)",
            hint=False,
        )
    column = table.column(image_column).combine_chunks()
    blobs_or_none = column.field("bytes").to_pylist()
    paths = column.field("path").to_pylist() if image_type.get_field_index("path") >= 0 else None
    blobs: list[bytes] = []
    origins = [f"{origin} row {row}" for row in range(len(blobs_or_none))]
    for row, blob in enumerate(blobs_or_none):
        if blob is None:  # an Image feature stored by path
            path = paths[row] if paths is not None else None
            if not path or not Path(path).is_file():
                raise dataset_error(
                    NAME,
                    f"{origins[row]}: image has neither bytes nor a readable path {path!r}",
                    hint=False,
                )
            blob = Path(path).read_bytes()
        blobs.append(blob)
    labels = table.column(label_column).to_numpy(zero_copy_only=False).astype(np.int64)
    return blobs, labels, origins


def _class_names(table: Any, label_column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``label_column`` from the features ``datasets`` keeps in
    the Arrow schema's metadata (None without them)."""
    raw = (table.schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw).get("info", {}).get("features", {}).get(label_column, {})
    except (ValueError, AttributeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature.get("names", [])] or None
    return None


def _classes(
    read: dict[str, tuple[list[bytes], np.ndarray, list[str]]],
    label_column: str,
    names: list[str] | None,
) -> list[str]:
    """Class names (the ClassLabel's, else ``0..max label``); every label must be in range."""
    labels = np.concatenate([labels for _, labels, _ in read.values()])
    count = len(names) if names else (int(labels.max()) + 1 if labels.size else 0)
    outside = labels[(labels < 0) | (labels >= count)]
    if outside.size:
        raise dataset_error(
            NAME,
            f"label column {label_column!r} holds {int(outside[0])}, outside [0, {count})"
            + (f" (its ClassLabel has {count} names)" if names else ""),
            hint=False,
        )
    train = read.get("train")
    if train is not None and "test" in read:
        missing = sorted(set(read["test"][1].tolist()) - set(train[1].tolist()))
        if missing:
            raise dataset_error(
                NAME,
                f"class(es) {missing} of the test split never occur in the train split.",
                hint=False,
            )
    return names if names else [str(c) for c in range(count)]
