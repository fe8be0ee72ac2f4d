"""Clients of LoRA ranks other than the global model's (``client_ranks``), for both engines.

The global model keeps ``lora_rank`` ``r``; client ``m`` trains a peft model of its own rank
``r_m`` (:meth:`~livar_merge.federated.config.FedConfig.client_rank`) and peft scaling
``s_m = lora_alpha / r_m``, and its update carries ``scaling = s_m`` so the merge folds it in
(``B_m <- (s_m / s) B_m``). :class:`RankModels` builds one such model per distinct rank, lazily,
exactly as the global model is built (same config with ``lora_rank = r_m``, same seed, so the
same backbone), and before each round copies into it everything of the global model that is
not a LoRA factor (frozen weights, folded in ``product`` mode, and the head), then sets its LoRA
to the round's start (:func:`start_lora`):

``product``  the merges are folded into the frozen weights, so the client's LoRA restarts:
             ``B = 0`` and Kaiming-uniform ``A`` from ``derive_seed(seed, round, "lora-restart",
             "rank", r_m)`` (one start per round and rank; the global model's own clients start
             from its LoRA restarted with ``derive_seed(seed, round - 1, "lora-restart")``).
``svd``      the client starts from the global product ``s B A`` re-factorised to its rank:
             ``s_m B_m A_m`` is the truncated SVD of ``s B A`` to ``min(r_m, q)`` components
             (``q``: the numerical rank of ``B A``), singular values split evenly; exact when
             ``r_m >= q`` (always when ``r_m >= r``). The remaining ``r_m - kept`` components
             have ``B`` columns 0 and fresh Kaiming ``A`` rows (seeded as above), so the product
             is unchanged and that rank can train (round 1: ``B A = 0``, the restart of
             ``product``). The energy the truncation dropped, :func:`start_truncation_energy`,
             is recorded by the server (``svd_energy.csv``).
``factors``  not allowed with mixed ranks (refused by ``validate_config``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from livar_merge.errors import GlobalStateError
from livar_merge.federated.data import derive_seed
from livar_merge.federated.model import snapshot_trainable
from livar_merge.lora import discarded_energy, truncated_svd
from livar_merge.lora_view import (
    ADAPTER,
    find_lora_parameters,
    is_lora_parameter,
    peft_scalings,
    restart_lora,
)

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig


def lora_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (B [d, r], A [r, k])}`` of a peft LoRA model (the parameters, not copies)."""
    return {layer: (b, a) for layer, (a, b) in find_lora_parameters(model).items()}


def model_rank(model: torch.nn.Module) -> int:
    """The LoRA rank of a peft model (of its first LoRA layer; livar builds one rank)."""
    factors = lora_factors(model)
    if not factors:
        raise GlobalStateError(f"model has no LoRA layer of adapter {ADAPTER!r}")
    return int(next(iter(factors.values()))[1].shape[0])


def numerical_rank(
    singular_values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> int:
    """Singular values above ``S_0 max(d, k) eps(dtype)`` (numpy's ``matrix_rank`` rule)."""
    if singular_values.numel() == 0 or float(singular_values[0]) <= 0.0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * torch.finfo(dtype).eps
    return int((singular_values > tolerance).sum())


def refactorise(
    b: torch.Tensor, a: torch.Tensor, rank: int, ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B' [d, kept], A' [kept, k], discarded energy)``: the truncated SVD of
    ``ratio * b @ a`` to ``kept = min(rank, numerical rank)`` components (singular values split
    evenly), without forming ``d x k``; the energy is the fraction of ``||b a||_F^2`` dropped."""
    svd = truncated_svd(b.detach() * ratio, a.detach(), max(1, min(rank, b.shape[1])))
    shape = (int(b.shape[0]), int(a.shape[1]))
    kept = min(rank, numerical_rank(svd.singular_values, shape, b.dtype))
    energy = discarded_energy(svd.singular_values, kept)
    return svd.B[:, :kept], svd.A[:kept], energy


def start_truncation_energy(model: torch.nn.Module, rank: int) -> dict[str, float]:
    """``{layer: fraction}`` of the global product ``B A`` of ``model`` that a client of LoRA
    rank ``rank`` does not receive when it starts from the product re-factorised to its rank
    (``svd`` mode, :func:`start_lora`); 0.0 wherever ``rank`` covers the product's rank."""
    return {layer: refactorise(b, a, rank)[2] for layer, (b, a) in lora_factors(model).items()}


@torch.no_grad()
def copy_non_lora_state(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every state entry of ``source`` that is not a LoRA factor (frozen weights, head,
    norms, embeddings) into ``target``, a peft model of the same backbone of another rank."""
    target_state = target.state_dict()
    for key, value in source.state_dict().items():
        if not is_lora_parameter(key):
            target_state[key].copy_(value)


@torch.no_grad()
def start_lora(
    model: torch.nn.Module,
    global_model: torch.nn.Module,
    *,
    lora_merge: str,
    seed: int,
    round_index: int,
) -> dict[str, float]:
    """Set the LoRA of ``model`` (a client model of another rank) to its start in round
    ``round_index`` from ``global_model`` (module docstring); returns the ``svd`` start's
    discarded energy ``{layer: fraction}`` (empty in ``product`` mode)."""
    rank = model_rank(model)
    factors = lora_factors(model)
    restart_lora(model, list(factors), derive_seed(seed, round_index, "lora-restart", "rank", rank))
    if lora_merge != "svd":
        return {}
    scaling, global_scaling = peft_scalings(model), peft_scalings(global_model)
    energies: dict[str, float] = {}
    for layer, (b, a) in lora_factors(global_model).items():
        ratio = global_scaling[layer] / scaling[layer]
        new_b, new_a, energies[layer] = refactorise(b, a, rank, ratio)
        kept = new_b.shape[1]
        target_b, target_a = factors[layer]
        target_b[:, :kept] = new_b.to(target_b.dtype)
        target_a[:kept] = new_a.to(target_a.dtype)
    return energies


class RankModels:
    """The client models of LoRA ranks other than the global model's, one per rank, built on
    first use from ``config`` (a FedConfig) as the global model was, on ``device``."""

    def __init__(self, config: FedConfig, num_classes: int, device: torch.device) -> None:
        self.config = config
        self.num_classes = num_classes
        self.device = device
        self.models: dict[int, torch.nn.Module] = {}
        # rank -> (round, trainable start state): clients of one rank share the round's start
        self._starts: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    def model(self, rank: int) -> torch.nn.Module:
        """The peft model of LoRA rank ``rank`` (built once, with the run's seed)."""
        if rank not in self.models:
            from livar_merge.federated.federation import build_seeded_model

            local = dataclasses.replace(self.config, lora_rank=rank)
            model, _ = build_seeded_model(local, self.num_classes, self.config.seed)
            self.models[rank] = model.to(self.device)
        return self.models[rank]

    def scaling(self, rank: int) -> float:
        """peft's LoRA scaling of a client of rank ``rank``, ``lora_alpha / rank``."""
        return float(self.config.lora_alpha) / rank

    def start(
        self, rank: int, global_model: torch.nn.Module, round_index: int, *, fresh: bool = False
    ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """``(model, start state)`` of rank ``rank`` in round ``round_index``: the first call of
        a round copies the global model's non-LoRA state into the model and sets its LoRA
        start (:func:`start_lora`); restore the state (``restore_parameters``) before each
        client of that rank trains. Call it before the round's clients change ``global_model``
        (or with ``global_model`` restored to the round's start). ``fresh``: set the start
        again even if this round's is cached (a Flower node, whose global model each message
        brings)."""
        model = self.model(rank)
        cached = self._starts.get(rank)
        if fresh or cached is None or cached[0] != round_index:
            copy_non_lora_state(global_model, model)
            start_lora(
                model,
                global_model,
                lora_merge=self.config.lora_merge,
                seed=self.config.seed,
                round_index=round_index,
            )
            cached = (round_index, snapshot_trainable(model))
            self._starts[rank] = cached
        return model, cached[1]
