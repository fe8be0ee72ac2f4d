"""RegMean [9] (Jin et al., ICLR 2023) on LoRA deltas and the head.

Each client sends the Gram matrix of the *inputs* of every LoRA-adapted Linear,
``G_m = X_m^T X_m`` ``[k, k]``, and of the head (inputs augmented with a constant 1 for the
bias). Off-diagonal entries are shrunk, ``G~ = a G + (1 - a) diag(G)`` (``a = shrinkage``, 0.5
in the released code), and the merged *dense delta* is the closed form
``dW = (sum_m dW_m G~_m)(sum_m G~_m)^-1`` solved in float64 (pseudo-inverse when singular). The
dense delta is applied exactly (``product``) or re-factorised to rank r (``svd``); RegMean has
no ``factors`` form. Cost: the Grams are dense, ``sum_l k_l^2`` float64 values per client and
round; at ViT-B/16 that is 135.1M values (1.08 GB) against 2.36M float32 LoRA values (9.4 MB) at
r = 16, about 115x the upload. ``livar-fed`` reports each client's ``statistics_bytes`` and
``statistics_seconds``. The paper's LoRA set-up of this baseline is not published; this
definition is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from livar_merge.aggregation.common import (
    client_head_biases,
    client_scaling_list,
    client_scalings,
    unweighted_result,
)
from livar_merge.aggregation.options import RegMeanOptions
from livar_merge.aggregation.types import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    MergeContext,
)
from livar_merge.errors import ClientUpdateError, MethodOptionError
from livar_merge.lora import (
    LoraDelta,
    MergeMode,
    client_factor_lists,
    discarded_energy,
    scaling_for,
    svd_target_rank,
)


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: off-diagonal entries scaled by ``a``. ``[k, k]``."""
    if not 0.0 <= shrinkage <= 1.0:
        raise MethodOptionError(f"RegMean shrinkage must be in [0, 1], got {shrinkage}")
    diag = torch.diag(torch.diagonal(gram))
    return shrinkage * gram + (1.0 - shrinkage) * diag


def regmean_solve(weighted_sum: torch.Tensor, gram_sum: torch.Tensor) -> torch.Tensor:
    """``X = weighted_sum @ gram_sum^-1`` in float64, via a symmetric solve (pinv if singular).

    ``weighted_sum [d, k]``, ``gram_sum [k, k]`` symmetric positive semi-definite.
    """
    a = gram_sum.double()
    b = weighted_sum.double()
    try:
        factor = torch.linalg.cholesky(a)
        return torch.cholesky_solve(b.T, factor).T
    except RuntimeError:  # singular: minimum-norm least squares, as the released code's pinv
        return b @ torch.linalg.pinv(a, hermitian=True)


def regmean_delta(
    factors_b: Sequence[torch.Tensor],
    factors_a: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    scaling: float | Sequence[float],
    shrinkage: float = 0.5,
) -> torch.Tensor:
    """RegMean's merged dense delta ``[d, k]`` from client factors ``B_m [d, r_m]``,
    ``A_m [r_m, k]`` (ranks may differ) and input Grams ``G_m [k, k]``:
    ``(sum_m s_m B_m (A_m G~_m)) (sum_m G~_m)^-1``, never forming a client's ``d x k`` delta
    before the product with its Gram. ``scaling``: one ``s`` for all clients or ``[s_m]``."""
    if not (len(factors_b) == len(factors_a) == len(grams)) or not grams:
        raise ClientUpdateError("RegMean needs one (B, A, Gram) triple per client")
    scalings = [float(scaling)] * len(grams) if isinstance(scaling, int | float) else scaling
    if len(scalings) != len(grams):
        raise ClientUpdateError(f"RegMean got {len(scalings)} scalings for {len(grams)} clients")
    total = None
    gram_sum = None
    for b, a, g, s in zip(factors_b, factors_a, grams, scalings, strict=True):
        g_shrunk = shrink_gram(g.double(), shrinkage)
        term = s * b.double() @ (a.double() @ g_shrunk)
        total = term if total is None else total + term
        gram_sum = g_shrunk if gram_sum is None else gram_sum + g_shrunk
    assert total is not None and gram_sum is not None
    return regmean_solve(total, gram_sum)


def regmean_head(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    shrinkage: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean of linear heads ``[C, D]`` + ``[C]`` with Grams of ``[x, 1]`` (``[D+1, D+1]``)."""
    augmented = [
        torch.cat([w.double(), b.double()[:, None]], dim=1)
        for w, b in zip(weights, biases, strict=True)
    ]
    total = sum(
        h @ shrink_gram(g.double(), shrinkage) for h, g in zip(augmented, grams, strict=True)
    )
    gram_sum = sum(shrink_gram(g.double(), shrinkage) for g in grams)
    merged = regmean_solve(total, gram_sum)  # type: ignore[arg-type]
    return merged[:, :-1], merged[:, -1]


def refactorise(dense: torch.Tensor, scaling: float, rank: int) -> LoraDelta:
    """Rank-``rank`` factors of ``dense / scaling`` ``[d, k]`` by truncated SVD (balanced), with
    the discarded fraction of the squared Frobenius norm as ``discarded_energy``."""
    u, s, vh = torch.linalg.svd(dense.double() / scaling, full_matrices=False)
    root = s[:rank].sqrt()
    return LoraDelta(
        scaling=scaling,
        B=(u[:, :rank] * root).float(),
        A=(root[:, None] * vh[:rank]).float(),
        discarded_energy=discarded_energy(s, rank),
    )


class RegMeanAggregator(Aggregator):
    """RegMean on the dense LoRA deltas (``product`` or ``svd``) and the head.

    Works on each client's dense delta ``s_m B_m A_m``, so clients' ranks and scalings
    (``ClientUpdate.scaling``) may differ; ``svd`` then needs the target ``rank``.
    """

    name = "regmean"
    needs = frozenset({"gram"})

    def __init__(
        self,
        *,
        lora_merge: MergeMode = "product",
        regmean_shrinkage: float = RegMeanOptions.regmean_shrinkage,
    ) -> None:
        if lora_merge == "factors":
            raise MethodOptionError(
                "regmean merges dense deltas: use lora_merge 'product' or 'svd'"
            )
        self.lora_merge = lora_merge
        self.shrinkage = regmean_shrinkage

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "lora_merge": self.lora_merge, "shrinkage": self.shrinkage}

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        """RegMean's closed-form merge of every layer and of the head (``ctx.previous_head``
        is not used: every client's head Gram covers every class)."""
        scaling, rank = ctx.scaling, ctx.rank
        ids = [u.client_id for u in updates]
        lists = client_factor_lists([u.lora for u in updates], client_ids=ids)
        lora: dict[str, LoraDelta] = {}
        for layer, (factors_b, factors_a) in lists.items():
            grams = [u.extras["gram"].get(layer) for u in updates]
            k = factors_a[0].shape[1]
            for u, g in zip(updates, grams, strict=True):
                if g is None or tuple(g.shape) != (k, k):
                    raise ClientUpdateError(
                        f"client {u.client_id!r}: Gram of layer {layer} missing or not [{k}, {k}]"
                    )
            s = scaling_for(scaling, layer)
            own = s if client_scalings(updates) is None else client_scaling_list(updates, s, layer)
            target = (
                svd_target_rank(layer, [int(f.shape[1]) for f in factors_b], rank, ids)
                if self.lora_merge == "svd"
                else None
            )
            dense = regmean_delta(
                factors_b, factors_a, grams, scaling=own, shrinkage=self.shrinkage
            )
            lora[layer] = (
                refactorise(dense, s, target)
                if target is not None
                else LoraDelta(scaling=s, dense=dense.float())
            )
        biases = client_head_biases(updates)
        if biases is None:
            raise ClientUpdateError("regmean's head merge expects a head with a bias")
        weight, bias = regmean_head(
            [u.head_weight for u in updates],
            biases,
            [u.extras["head_gram"] for u in updates],
            shrinkage=self.shrinkage,
        )
        dtype = updates[0].head_weight.dtype
        return unweighted_result(updates, lora, weight.to(dtype), bias.to(dtype))
