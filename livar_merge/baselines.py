"""The paper's baselines (Tables 1-3) defined for LoRA on the block Linears plus a trained head.

The authors' framework has most of these as full fine-tuning versions; how the paper ran them on
LoRA is not published, so the definitions here are ours (documented per function):

* **RegMean** [9] (Jin et al., ICLR 2023): each client sends the Gram matrix of the *inputs* of
  every LoRA-adapted Linear, ``G_m = X_m^T X_m`` ``[k, k]``, and of the head (inputs augmented
  with a constant 1 for the bias). Off-diagonal entries are shrunk,
  ``G~ = a G + (1 - a) diag(G)`` (``a = shrinkage``, 0.5 in the released code), and the merged
  *dense delta* is the closed form ``dW = (sum_m dW_m G~_m)(sum_m G~_m)^-1`` solved in float64
  (pseudo-inverse when singular). The dense delta is applied exactly (``product``) or
  re-factorised to rank r (``svd``); RegMean has no ``factors`` form. Cost: the Grams are dense,
  ``sum_l k_l^2`` float64 values per client and round; at ViT-B/16 that is 135.1M values
  (1.08 GB) against 2.36M float32 LoRA values (9.4 MB) at r = 16, about 115x the upload.
  ``livar-fed`` reports each client's ``statistics_bytes`` and ``statistics_seconds``.
* **Fisher averaging** [18] (Matena & Raffel, NeurIPS 2022): per trainable parameter (LoRA A, B
  and the head), ``theta = sum_m F_m theta_m / sum_m F_m`` with ``F_m`` the diagonal empirical
  Fisher (mean over local samples of the squared per-sample gradient of the log-likelihood) plus
  a floor ``eps`` so parameters no client moved average uniformly. LoRA is merged as factors.
* **FedProto** [26] (Tan et al., AAAI 2022): local loss ``CE + lambda * ||f(x) - P_y||^2`` with
  the global class prototypes ``P`` (count-weighted means of the clients' class-mean features);
  LoRA and head by FedAvg.
* **CCVR** [17] (Luo et al., NeurIPS 2021): after aggregation, clients send per-class feature
  means, covariances (full or diagonal) and counts computed with the *new global* backbone; the
  server pools them, samples ``samples_per_class`` virtual features per class from the Gaussians
  and re-trains the head (SGD momentum 0.9, lr 0.01, cosine schedule, 5 epochs, logit-normalised
  cross-entropy with temperature 0.1, as the released code). ``livar-fed`` calibrates after every
  round, so the next round starts from the calibrated head (``--ccvr-rounds all``, default), or
  once after the last round (``last``: post hoc, as the CCVR paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from livar_merge.errors import ClientUpdateError

# ----------------------------------------------------------------------------- RegMean


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: off-diagonal entries scaled by ``a``. ``[k, k]``."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"RegMean shrinkage must be in [0, 1], got {shrinkage}")
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
    scaling: float,
    shrinkage: float = 0.5,
) -> torch.Tensor:
    """RegMean's merged dense delta ``[d, k]`` from client factors ``B_m [d, r]``, ``A_m [r, k]``
    and input Grams ``G_m [k, k]``: ``(sum_m s B_m (A_m G~_m)) (sum_m G~_m)^-1``, never forming
    a client's ``d x k`` delta before the product with its Gram."""
    if not (len(factors_b) == len(factors_a) == len(grams)) or not grams:
        raise ClientUpdateError("RegMean needs one (B, A, Gram) triple per client")
    total = None
    gram_sum = None
    for b, a, g in zip(factors_b, factors_a, grams, strict=True):
        g_shrunk = shrink_gram(g.double(), shrinkage)
        term = scaling * b.double() @ (a.double() @ g_shrunk)
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


# ----------------------------------------------------------------------------- Fisher


def fisher_average(
    params: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], *, floor: float = 1e-8
) -> torch.Tensor:
    """Element-wise ``sum_m (F_m + eps) theta_m / sum_m (F_m + eps)``."""
    if len(params) != len(fishers) or not params:
        raise ClientUpdateError("Fisher averaging needs one Fisher per client parameter")
    num = sum((f.double() + floor) * p.double() for p, f in zip(params, fishers, strict=True))
    den = sum(f.double() + floor for f in fishers)
    return (num / den).to(params[0].dtype)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- prototypes


def pooled_prototypes(
    means: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Global prototypes ``[C, D]`` (count-weighted class means; NaN rows for unseen classes)
    and the pooled counts ``[C]``."""
    n = np.stack([np.asarray(c, dtype=np.float64) for c in counts])  # [M, C]
    mu = np.stack([np.nan_to_num(np.asarray(m, dtype=np.float64)) for m in means])  # [M, C, D]
    total = n.sum(0)
    proto = np.einsum("mc,mcd->cd", n, mu)
    with np.errstate(invalid="ignore", divide="ignore"):
        proto = proto / total[:, None]
    proto[total == 0] = np.nan
    return proto, total


# ----------------------------------------------------------------------------- CCVR


@dataclass(frozen=True)
class ClassMoments:
    """Pooled per-class feature moments: ``mean [C, D]``, ``cov [C, D, D]`` (or ``[C, D]``
    diagonal) and ``count [C]``."""

    mean: np.ndarray
    cov: np.ndarray
    count: np.ndarray


def pool_moments(
    means: Sequence[np.ndarray], covs: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> ClassMoments:
    """Combine clients' class moments (CCVR Eq. 3-4): with ``N_c = sum n_mc``,
    ``mu_c = sum n_mc mu_mc / N_c`` and
    ``S_c = (sum (n_mc - 1) S_mc + sum n_mc mu_mc mu_mc^T - N_c mu_c mu_c^T) / (N_c - 1)``.
    Client covariances are unbiased (ddof 1); diagonal ones give a diagonal pooled covariance."""
    n = np.stack([np.asarray(c, dtype=np.float64) for c in counts])
    mu = np.stack([np.nan_to_num(np.asarray(m, dtype=np.float64)) for m in means])
    cov = np.stack([np.nan_to_num(np.asarray(s, dtype=np.float64)) for s in covs])
    diagonal = cov.ndim == 3
    total = n.sum(0)
    mean = np.einsum("mc,mcd->cd", n, mu) / np.maximum(total, 1)[:, None]
    dof = np.maximum(n - 1, 0)
    if diagonal:
        scatter = np.einsum("mc,mcd->cd", dof, cov) + np.einsum("mc,mcd->cd", n, mu**2)
        scatter -= total[:, None] * mean**2
        pooled = scatter / np.maximum(total - 1, 1)[:, None]
    else:
        scatter = np.einsum("mc,mcde->cde", dof, cov)
        scatter += np.einsum("mc,mcd,mce->cde", n, mu, mu)
        scatter -= total[:, None, None] * np.einsum("cd,ce->cde", mean, mean)
        pooled = scatter / np.maximum(total - 1, 1)[:, None, None]
    return ClassMoments(mean=mean, cov=pooled, count=total)


def sample_virtual_features(
    moments: ClassMoments, samples_per_class: int, *, seed: int, min_count: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual features ``[n, D]`` (float32) and labels ``[n]`` from ``N(mu_c, S_c)`` for every
    class with at least ``min_count`` pooled samples."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for c in np.flatnonzero(moments.count >= min_count):
        cov = moments.cov[c]
        if cov.ndim == 1:
            draws = moments.mean[c] + rng.standard_normal((samples_per_class, cov.size)) * np.sqrt(
                np.maximum(cov, 0)
            )
        else:
            sym = (cov + cov.T) / 2
            vals, vecs = np.linalg.eigh(sym)
            root = vecs * np.sqrt(np.maximum(vals, 0))
            draws = moments.mean[c] + rng.standard_normal((samples_per_class, len(vals))) @ root.T
        feats.append(draws)
        labels.append(np.full(samples_per_class, c))
    if not feats:
        raise ClientUpdateError("CCVR: no class has enough pooled samples to sample from")
    return (
        torch.as_tensor(np.concatenate(feats), dtype=torch.float32),
        torch.as_tensor(np.concatenate(labels), dtype=torch.long),
    )


def logit_norm_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of ``logits / (||logits|| * temperature)`` (LogitNorm, Wei et al. 2022)."""
    norms = logits.norm(p=2, dim=-1, keepdim=True) + 1e-7
    return torch.nn.functional.cross_entropy(logits / (norms * temperature), labels)


def retrain_head(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5,
    lr: float = 0.01,
    momentum: float = 0.9,
    batch_size: int = 64,
    temperature: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-train a linear head on virtual features (SGD, cosine schedule, LogitNorm CE)."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            loss = logit_norm_loss(head(features[idx]), labels[idx], temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    new_bias = None if bias is None else head.bias.detach().to(bias.dtype)
    return head.weight.detach().to(weight.dtype), new_bias
