"""Image-classification datasets for the federated runtime, each read from its standard format.

One registry (:data:`DATASETS`) maps a dataset name to a loader; :func:`load_dataset` returns a
:class:`DatasetSplits` with a train and a test :class:`LabeledImages`. Every item is a
``(uint8 tensor [C, H, W], int label)`` pair. Nothing is ever downloaded: a missing or malformed
dataset raises :class:`DatasetError` naming the file/folder expected, the accepted layout(s) and
how to obtain the data.

Modules: ``images`` (containers, decoding, resizing), ``splits`` (DatasetSplits, subsets,
stratified sampling), ``registry`` (registration, :func:`load_dataset`, error hints),
``formats`` (on-disk format readers), ``sources`` (one loader per dataset). Heavy libraries
(PIL, pyarrow, scikit-learn) are imported inside the functions that need them.
"""

from __future__ import annotations

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets import sources  # noqa: F401 (registers the loaders)
from livar_merge.federated.datasets.formats.idx import read_idx
from livar_merge.federated.datasets.images import (
    EncodedImages,
    FileImages,
    InMemoryImages,
    LabeledImages,
)
from livar_merge.federated.datasets.registry import (
    DATASETS,
    DatasetInfo,
    available_datasets,
    load_dataset,
    loader_options,
    register_dataset,
)
from livar_merge.federated.datasets.splits import DatasetSplits, stratified_subsample, subset

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
    "loader_options",
    "read_idx",
    "register_dataset",
    "stratified_subsample",
    "subset",
]
