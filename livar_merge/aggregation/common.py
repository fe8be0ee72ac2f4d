"""Helpers the method modules share: the clients' head biases and the result of a merge that
has no per-client weights (RegMean, Fisher averaging)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from livar_merge.aggregation.types import AggregationResult, ClientUpdate
from livar_merge.errors import ClientUpdateError
from livar_merge.heads import MergedHead
from livar_merge.lora import LoraDelta


def client_head_biases(updates: Sequence[ClientUpdate]) -> list[torch.Tensor] | None:
    """The clients' head biases, or None when the first client's head has none;
    :class:`ClientUpdateError` naming a later client whose head has no bias."""
    if updates[0].head_bias is None:
        return None
    biases = []
    for u in updates:
        if u.head_bias is None:
            raise ClientUpdateError(
                f"client {u.client_id!r} sent a head without a bias, the first client's has one"
            )
        biases.append(u.head_bias)
    return biases


def no_class_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """``[clients, classes]`` of NaN: a head merge without per-class client weights."""
    return np.full((len(updates), updates[0].head_weight.shape[0]), np.nan)


def unweighted_result(
    updates: Sequence[ClientUpdate],
    lora: dict[str, LoraDelta],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> AggregationResult:
    """The result of a merge with no per-client weights: NaN LoRA and class weight tables."""
    head = MergedHead(weight, bias, no_class_weights(updates), ())
    weights = np.full((len(updates), len(lora)), np.nan)
    return AggregationResult(lora, head, weights, tuple(lora), {})
