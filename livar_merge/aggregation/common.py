"""Helpers the method modules share: the clients' head biases and own LoRA scalings, the svd
merge's discarded energy for ``details``, and the result of a merge that has no per-client
weights (RegMean, Fisher averaging)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from livar_merge.aggregation.types import SVD_ENERGY_KEY, AggregationResult, ClientUpdate, Scaling
from livar_merge.errors import ClientUpdateError
from livar_merge.heads import MergedHead
from livar_merge.lora import LoraDelta, scaling_for, svd_discarded_energies


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


def client_scalings(updates: Sequence[ClientUpdate]) -> list[Scaling | None] | None:
    """The clients' own LoRA scalings (``ClientUpdate.scaling``) for ``merge_lora``'s
    ``client_scalings``, or None when no client sent one (all use the server's)."""
    own = [u.scaling for u in updates]
    return None if all(s is None for s in own) else own


def client_scaling_list(
    updates: Sequence[ClientUpdate], scaling: Scaling, layer: str
) -> list[float]:
    """Each client's LoRA scaling of ``layer``: its own (``ClientUpdate.scaling``) or else the
    server's ``scaling``."""
    values = []
    for u in updates:
        own = u.scaling
        if own is None:
            values.append(scaling_for(scaling, layer))
        elif isinstance(own, Mapping) and layer not in own:
            raise ClientUpdateError(
                f"client {u.client_id!r}: no LoRA scaling given for layer {layer}"
            )
        else:
            values.append(scaling_for(own, layer))
    return values


def svd_details(lora: Mapping[str, LoraDelta]) -> dict[str, Any]:
    """``{"svd_discarded_energy": {layer: fraction}}`` for svd-merged deltas, else ``{}``."""
    energies = svd_discarded_energies(lora)
    return {SVD_ENERGY_KEY: energies} if energies else {}


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
    return AggregationResult(lora, head, weights, tuple(lora), svd_details(lora))
