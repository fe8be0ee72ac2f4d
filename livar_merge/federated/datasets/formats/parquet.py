"""Parquet shards of encoded images: columns ``image`` (struct with ``bytes``) and ``label``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livar_merge.federated.datasets.images import first_label_outside
from livar_merge.federated.datasets.registry import dataset_error


def read_image_shards(
    dataset: str, files: list[Path], num_classes: int | None
) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Image bytes, labels [N] and origins ('file row i') of parquet shards.

    Labels are checked against ``[0, num_classes)`` when ``num_classes`` is given.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs: list[bytes] = []
    labels: list[np.ndarray] = []
    origins: list[str] = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise dataset_error(
                dataset, f"cannot read parquet file {path}: {exc}", hint=False
            ) from exc
        missing = {"image", "label"} - set(table.column_names)
        if missing:
            raise dataset_error(
                dataset,
                f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                f"found {', '.join(table.column_names)}",
            )
        image_type = table.schema.field("image").type
        if not pa.types.is_struct(image_type) or image_type.get_field_index("bytes") < 0:
            raise dataset_error(
                dataset,
                f"{path}: column image must be a struct with a bytes field, is {image_type}",
            )
        if not pa.types.is_integer(table.schema.field("label").type):
            raise dataset_error(
                dataset,
                f"{path}: column label must be integer, is {table.schema.field('label').type}",
            )
        column = table.column("image").combine_chunks().field("bytes").to_pylist()
        label = table.column("label").to_numpy(zero_copy_only=False)
        for row, blob in enumerate(column):
            if blob is None:
                raise dataset_error(
                    dataset, f"{path} row {row}: field image.bytes is null", hint=False
                )
        if table.column("label").null_count:
            raise dataset_error(dataset, f"{path}: column label holds nulls", hint=False)
        label = label.astype(np.int64)
        bad = first_label_outside(label, num_classes) if num_classes is not None else None
        if bad is not None:
            raise dataset_error(
                dataset,
                f"{path} row {bad}: field label = {int(label[bad])} is outside [0, {num_classes})",
                hint=False,
            )
        blobs += column
        labels.append(label)
        origins += [f"{path} row {row}" for row in range(len(column))]
    return blobs, np.concatenate(labels), origins
