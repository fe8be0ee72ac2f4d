"""Splitting a labelled dataset across federated clients.

The Dirichlet protocol (as used by the LIVAR authors, the default): for each class c, client
proportions ``p_c ~ Dir(beta * 1_M)``; every sample of class c goes to a client drawn from
``p_c``. Small ``beta`` gives strongly skewed clients, large ``beta`` near-uniform ones. The
partitioners of flwr-datasets (IID, shards, pathological, its Dirichlet) are options
(:func:`partition_clients`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from livar_merge.errors import PartitionError

if TYPE_CHECKING:
    import pandas

__all__ = [
    "PartitionError",
    "class_count_table",
    "dirichlet_partition",
    "flwr_partition",
    "partition_clients",
]


def _check_count(name: str, value: int, low: int) -> int:
    """``value`` as an int >= low, else PartitionError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise PartitionError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a 1-D array [N]."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {arr.shape}")
    return arr


def _dirichlet_owners(
    class_indices: list[np.ndarray], num_samples: int, alpha: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Client id [N] of every sample: per class p ~ Dir(alpha), per-sample draw from p.

    Drawing each sample's client iid from p is a multinomial draw of the class's client counts
    followed by handing the class's shuffled samples out in blocks of those counts.
    """
    owner = np.empty(num_samples, dtype=np.int64)
    clients = np.arange(alpha.shape[0])
    for members in class_indices:
        p = rng.dirichlet(alpha)
        p = p / p.sum()
        counts = rng.multinomial(members.shape[0], p)
        owner[rng.permutation(members)] = np.repeat(clients, counts)
    return owner


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    *,
    seed: int,
    min_samples: int = 1,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet(beta) label-skew split of ``labels`` [N] -> num_clients sorted index arrays.

    The whole split is redrawn until every client holds >= ``min_samples`` samples (at most
    ``max_attempts`` draws). The arrays are disjoint and cover ``range(N)``. Same seed, same split.
    """
    labels = _check_labels(labels)
    num_clients = _check_count("num_clients", num_clients, 1)
    min_samples = _check_count("min_samples", min_samples, 0)
    max_attempts = _check_count("max_attempts", max_attempts, 1)
    n = labels.shape[0]
    if not (np.isfinite(beta) and beta > 0):
        raise PartitionError(f"beta must be a finite number > 0, got {beta!r}")
    if num_clients * min_samples > n:
        raise PartitionError(
            f"cannot give {num_clients} clients at least {min_samples} samples each from a "
            f"dataset of {n}; lower num_clients or min_samples"
        )
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds: np.ndarray | list[int] = np.cumsum(np.bincount(inverse))[:-1] if n else []
    class_indices = np.split(order, bounds) if n else []
    alpha = np.full(num_clients, float(beta))
    best = -1
    for _ in range(max_attempts):
        owner = _dirichlet_owners(class_indices, n, alpha, rng)
        counts = np.bincount(owner, minlength=num_clients)
        if counts.min() >= min_samples:
            return [np.flatnonzero(owner == m) for m in range(num_clients)]
        best = max(best, int(counts.min()))
    raise PartitionError(
        f"no Dirichlet split with every client holding >= {min_samples} samples after "
        f"{max_attempts} attempts (best achieved minimum: {best} samples; num_clients="
        f"{num_clients}, beta={beta}, dataset size {n}, {len(class_indices)} classes); raise "
        f"beta, lower num_clients or min_samples, or allow more max_attempts"
    )


def class_count_table(
    parts: list[np.ndarray], labels: np.ndarray, num_classes: int
) -> pandas.DataFrame:
    """Per-client class counts: rows client_0..client_{M-1}, int columns 0..K-1 and 'total'."""
    import pandas as pd

    labels = _check_labels(labels)
    num_classes = _check_count("num_classes", num_classes, 1)
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
        raise PartitionError(f"labels must be integers in [0, {num_classes})")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for m, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= labels.shape[0]):
            raise PartitionError(f"client {m} holds indices outside [0, {labels.shape[0]})")
        counts[m] = np.bincount(labels[idx], minlength=num_classes)
    table = pd.DataFrame(
        counts, index=[f"client_{m}" for m in range(len(parts))], columns=list(range(num_classes))
    )
    table["total"] = counts.sum(axis=1)
    return table


FLWR_PARTITIONERS = ("iid", "shards", "pathological", "flwr-dirichlet")


def check_partitioner(name: str) -> None:
    """Refuse a flwr-datasets partitioner when flwr-datasets is not installed."""
    if name in FLWR_PARTITIONERS:
        try:
            import flwr_datasets.partitioner  # noqa: F401
        except ImportError as err:
            raise PartitionError(
                f"option partitioner {name!r} needs flwr-datasets (the flower extra: pip install "
                f"'livar[flower]'): {err}"
            ) from err


def flwr_partition(
    labels: np.ndarray,
    num_clients: int,
    partitioner: str,
    *,
    seed: int,
    beta: float = 0.5,
    min_samples: int = 1,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """A flwr-datasets split of ``labels`` [N] -> ``num_clients`` sorted index arrays.

    ``iid``: ``IidPartitioner`` on the samples shuffled with ``seed`` (it cuts contiguous
    blocks); ``shards``: ``ShardPartitioner`` (``shards_per_client`` label-sorted shards each);
    ``pathological``: ``PathologicalPartitioner`` (``classes_per_client`` classes each, assigned
    at random); ``flwr-dirichlet``: ``DirichletPartitioner`` with ``alpha = beta`` and its own
    ``min_partition_size = min_samples``. Every one is seeded; a client left with fewer than
    ``min_samples`` samples is refused, naming it.
    """
    import datasets
    from flwr_datasets import partitioner as flwr

    labels = _check_labels(labels).astype(np.int64)
    num_clients = _check_count("num_clients", num_clients, 1)
    table = datasets.Dataset.from_dict({"label": labels, "index": np.arange(labels.shape[0])})
    split: Any
    if partitioner == "iid":
        table = table.shuffle(seed=seed)
        split = flwr.IidPartitioner(num_partitions=num_clients)
    elif partitioner == "shards":
        split = flwr.ShardPartitioner(
            num_clients, "label", num_shards_per_partition=shards_per_client, seed=seed
        )
    elif partitioner == "pathological":
        split = flwr.PathologicalPartitioner(
            num_clients, "label", num_classes_per_partition=classes_per_client, seed=seed
        )
    elif partitioner == "flwr-dirichlet":
        split = flwr.DirichletPartitioner(
            num_clients, "label", alpha=beta, min_partition_size=min_samples, seed=seed
        )
    else:
        raise PartitionError(f"unknown flwr-datasets partitioner {partitioner!r}")
    split.dataset = table
    try:
        parts = [
            np.sort(np.asarray(split.load_partition(m)["index"], dtype=np.int64))
            for m in range(num_clients)
        ]
    except ValueError as err:  # the partitioners' own refusals (too few samples or classes)
        raise PartitionError(f"partitioner {partitioner!r}: {err}") from err
    for m, part in enumerate(parts):
        if part.shape[0] < min_samples:
            raise PartitionError(
                f"partitioner {partitioner!r} gave client_{m} {part.shape[0]} samples, fewer "
                f"than min_client_samples {min_samples}; change its options or num_clients"
            )
    return parts


def partition_clients(
    labels: np.ndarray,
    num_clients: int,
    *,
    partitioner: str = "dirichlet",
    beta: float,
    seed: int,
    min_samples: int,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """The clients' sample indices under ``partitioner`` (``dirichlet``:
    :func:`dirichlet_partition`, unchanged; the others: :func:`flwr_partition`)."""
    if partitioner == "dirichlet":
        return dirichlet_partition(labels, num_clients, beta, seed=seed, min_samples=min_samples)
    check_partitioner(partitioner)
    return flwr_partition(
        labels,
        num_clients,
        partitioner,
        seed=seed,
        beta=beta,
        min_samples=min_samples,
        shards_per_client=shards_per_client,
        classes_per_client=classes_per_client,
    )
