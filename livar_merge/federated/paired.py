"""Paired evaluation: every method on the same client updates.

Each round the server aggregates the round's accepted client updates once with the run's own
method (which becomes the next global model) and, in addition, with every method of
``paired``: each such result is installed on a copy of the pre-round global model, evaluated on
the test set and discarded. The run's trajectory does not depend on ``paired`` (the clients only
compute the extra statistics those methods need, after their local training). Because both
models come from identical client updates, the difference of their accuracies isolates the
aggregation rule from the trajectory noise that separate runs add.

Used by both engines (``livar-fed``'s in-process runner and the Flower ``LivarStrategy``).
Rows of ``paired.csv``: round, method, test_accuracy, test_loss, difference (paired method minus
the run's own method, in top-1), aggregation_seconds, evaluation_seconds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livar_merge.aggregation import ClientUpdate, make_aggregator
from livar_merge.aggregation.types import Aggregator
from livar_merge.errors import PairedMethodError as PairedMethodError  # re-exported
from livar_merge.federated.config import check_paired_methods
from livar_merge.federated.install import install_result

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig

Evaluate = Callable[[torch.nn.Module], tuple[float, float]]


def check_paired(
    own_method: str, paired: Sequence[str], method_options: Mapping[str, Any] | None = None
) -> dict[str, Aggregator]:
    """The paired methods' aggregators, after :func:`check_paired_methods` (the torch-free
    check ``validate_config`` runs before any data or model is built). Each method takes the
    options it declares from ``method_options`` (a run's values; others keep the defaults)."""
    specs = check_paired_methods(own_method, paired)
    values = dict(method_options or {})
    return {name: make_aggregator(name, **spec.select(values)) for name, spec in specs.items()}


class PairedEvaluation:
    """The paired methods of a run and how to evaluate a model; stateless between rounds."""

    def __init__(
        self,
        own_method: str,
        paired: Sequence[str],
        method_options: Mapping[str, Any],
        *,
        lora_merge: str,
        seed: int,
    ) -> None:
        self.own_method = own_method
        self.aggregators = check_paired(own_method, paired, method_options)
        self.lora_merge = lora_merge
        self.seed = seed

    @property
    def methods(self) -> list[str]:
        return list(self.aggregators)

    @property
    def needs(self) -> frozenset[str]:
        """Client statistics the paired methods need (the run collects them too)."""
        out: set[str] = set()
        for aggregator in self.aggregators.values():
            out |= aggregator.needs
        return frozenset(out)

    def evaluate_round(
        self,
        model: torch.nn.Module,
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
        previous_head: tuple[torch.Tensor, torch.Tensor | None],
        scaling: float | Mapping[str, float],
        evaluate: Evaluate,
        rank: int | None = None,
    ) -> list[dict[str, Any]]:
        """One row per paired method. ``model`` is the pre-round global model (the one the
        clients started from); it is copied, never modified. ``rank``: the global model's LoRA
        rank, the svd target, when the clients' ranks differ from it (as the run's merge)."""
        rows = []
        for name, aggregator in self.aggregators.items():
            start = time.perf_counter()
            result = aggregator.aggregate(
                updates, previous_head=previous_head, scaling=scaling, rank=rank
            )
            candidate = copy.deepcopy(model)
            install_result(
                candidate,
                result,
                lora_merge=self.lora_merge,
                seed=self.seed,
                round_index=round_index,
            )
            aggregated = time.perf_counter()
            accuracy, loss = evaluate(candidate)
            del candidate
            rows.append(
                {
                    "round": round_index,
                    "method": name,
                    "test_accuracy": accuracy,
                    "test_loss": loss,
                    "difference": None,
                    "aggregation_seconds": aggregated - start,
                    "evaluation_seconds": time.perf_counter() - aggregated,
                }
            )
        return rows


def paired_from_config(config: FedConfig) -> PairedEvaluation | None:
    """The :class:`PairedEvaluation` of a ``FedConfig`` (None without ``paired``)."""
    if not config.paired:
        return None
    return PairedEvaluation(
        config.method,
        config.paired,
        config.method_options(*config.paired),
        lora_merge=config.lora_merge,
        seed=config.seed,
    )


def with_differences(rows: list[dict[str, Any]], own_accuracy: float) -> list[dict[str, Any]]:
    """``rows`` with ``difference`` = paired top-1 minus the run's own top-1 of that round."""
    return [{**row, "difference": row["test_accuracy"] - own_accuracy} for row in rows]


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std and the two-sided Student-t interval of the mean (None for n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def paired_summary(rows: Sequence[Mapping[str, Any]], own_method: str) -> dict[str, Any]:
    """``summary.json``'s ``paired`` entry: per method, the final round's difference, the
    differences' mean and 95 % t-interval over rounds, wins, and the extra cost."""
    out: dict[str, Any] = {"against": own_method, "methods": {}}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["round"])
        diffs = [float(r["difference"]) for r in mine]
        out["methods"][name] = {
            "final_accuracy": float(mine[-1]["test_accuracy"]),
            "final_difference": diffs[-1],
            "rounds": mean_interval(diffs),
            "rounds_better": int(sum(d > 0 for d in diffs)),
            "rounds_worse": int(sum(d < 0 for d in diffs)),
            "aggregation_seconds": float(sum(r["aggregation_seconds"] for r in mine)),
            "evaluation_seconds": float(sum(r["evaluation_seconds"] for r in mine)),
        }
    return out
