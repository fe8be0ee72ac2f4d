"""Client sampling: which clients train in a round (FedAvg's fraction C, Flower's
``fraction_train``), the one rule both engines use.

A round samples ``K`` of the clients available to it without replacement, uniformly, from a
generator seeded by ``derive_seed(seed, round, "participants")``; the available clients are
put in natural client-id order first, so the draw depends only on the run seed, the round and
the set of available ids (not on node ids, arrival order or earlier rounds): a resumed run
samples the same clients, and Flower (which samples among the connected nodes' clients) samples
the same ones as ``livar-fed`` when every client is connected. Imports no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from livar_merge.errors import ConfigError
from livar_merge.federated.seeds import derive_seed


def client_order(client_id: str) -> tuple[Any, ...]:
    """Natural sort key: ``client_2`` before ``client_10`` (the order ``livar-fed`` uses)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", client_id))


def clients_per_round(
    num_clients: int, count: int | None = None, fraction: float | None = None
) -> int | None:
    """``K``: ``count``, else ``max(1, floor(fraction * num_clients))`` (Flower's rule, with
    at least one client, computed exactly: :func:`fraction_count`), else None (every client,
    every round)."""
    if count is not None and fraction is not None:
        raise ConfigError("give clients_per_round or fraction_train, not both")
    if count is not None:
        if not 1 <= count <= num_clients:
            raise ConfigError(
                f"clients_per_round must be in [1, num_clients={num_clients}], got {count}"
            )
        return None if count == num_clients else count
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {fraction}")
        k = fraction_count(fraction, num_clients)
        return None if k == num_clients else k
    return None


def fraction_count(fraction: float, num_clients: int) -> int:
    """``max(1, floor(C M))`` in exact rational arithmetic, ``C`` read as the decimal it is
    written as (its shortest repr): 0.29 of 100 clients is 29, where the float product
    ``0.29 * 100 = 28.999...`` truncates to 28."""
    return max(1, math.floor(Fraction(repr(float(fraction))) * num_clients))


def sample_participants(
    available: Iterable[str], k: int | None, *, seed: int, round_index: int
) -> list[str]:
    """The ``k`` clients of ``available`` that train in round ``round_index``, in client-id
    order (all of them when ``k`` is None or at least their number)."""
    ordered = sorted(set(available), key=client_order)
    if k is None or k >= len(ordered):
        return ordered
    rng = np.random.default_rng(derive_seed(seed, round_index, "participants"))
    chosen = np.sort(rng.choice(len(ordered), size=k, replace=False))
    return [ordered[i] for i in chosen]


def participation_counts(
    client_ids: Sequence[str], k: int | None, *, seed: int, rounds: int
) -> dict[str, int]:
    """How often each client trains in rounds ``1..rounds`` (for reports and tests)."""
    counts = dict.fromkeys(client_ids, 0)
    for r in range(1, rounds + 1):
        for cid in sample_participants(client_ids, k, seed=seed, round_index=r):
            counts[cid] += 1
    return counts
