"""FedAvg (McMahan et al. [19]) on LoRA factors and the head: the baseline every method meets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from livar_merge.errors import ClientUpdateError
from livar_merge.heads import MergedHead, merge_heads, sample_class_weights
from livar_merge.lora import LoraDelta, MergeMode, merge_lora


def fedavg_weights(num_samples: Any) -> np.ndarray:
    """``n_m / sum_j n_j`` as float64 ``[clients]``."""
    n = np.asarray(num_samples, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or not np.isfinite(n).all() or (n < 0).any() or n.sum() <= 0:
        raise ClientUpdateError(f"sample counts must be non-negative with a positive sum, got {n}")
    return n / n.sum()


def fedavg_lora(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    num_samples: Any,
    *,
    mode: MergeMode = "factors",
    **merge_options: Any,
) -> dict[str, LoraDelta]:
    """Sample-weighted average of the clients' LoRA (``factors`` mode: average of B and of A)."""
    return merge_lora(client_states, fedavg_weights(num_samples), mode=mode, **merge_options)


def fedavg_head(
    head_weights: Sequence[torch.Tensor],
    head_biases: Sequence[torch.Tensor] | None,
    num_samples: Any,
    **merge_options: Any,
) -> MergedHead:
    """Sample-weighted average of the clients' heads (every class weighted by ``n_m``)."""
    weights = sample_class_weights(num_samples, head_weights[0].shape[0])
    return merge_heads(head_weights, head_biases, weights, **merge_options)
