"""CCVR [17] (Luo et al., NeurIPS 2021): a base method, then head calibration on virtual features.

After aggregation, clients send per-class feature means, covariances (full or diagonal) and
counts computed with the *new global* backbone; the server pools them (:func:`pool_moments`),
samples ``samples_per_class`` virtual features per class from the Gaussians
(:func:`sample_virtual_features`) and re-trains the head (:func:`retrain_head`: SGD momentum
0.9, lr 0.01, cosine schedule, 5 epochs, logit-normalised cross-entropy with temperature 0.1, as
the released code). ``livar-fed`` calibrates after every round, so the next round starts from
the calibrated head (``--ccvr-rounds all``, default), or once after the last round (``last``:
post hoc, as the CCVR paper). ``ccvr`` calibrates FedAvg, ``livar+ccvr`` LIVAR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from livar_merge.aggregation.options import CCVROptions
from livar_merge.aggregation.types import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    InstallContext,
    MergeContext,
)
from livar_merge.aggregation.weighted import TableLike, fedavg, livar
from livar_merge.errors import ClientUpdateError, ConfigError, MethodOptionError
from livar_merge.lora import MergeMode


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
    """Re-train a linear head ``[C, D]`` (+ ``[C]``) on virtual features ``[n, D]`` (SGD,
    cosine schedule, LogitNorm CE)."""
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


class CCVRAggregator(Aggregator):
    """A base method followed by CCVR's head calibration on virtual features.

    ``needs`` includes ``"moments"``: after the merge is installed (:meth:`after_install`:
    every round with ``ccvr_rounds="all"``, the last one with ``"last"``) it asks the round's
    clients, through the engine's :class:`ClientQuery`, for their per-class feature moments
    under the new global model and re-trains the head (:meth:`calibrate`).
    """

    def __init__(
        self,
        base: Aggregator,
        *,
        ccvr_samples: int = CCVROptions.ccvr_samples,
        ccvr_epochs: int = CCVROptions.ccvr_epochs,
        ccvr_lr: float = CCVROptions.ccvr_lr,
        ccvr_temperature: float = CCVROptions.ccvr_temperature,
        ccvr_covariance: Literal["full", "diag"] = CCVROptions.ccvr_covariance,
        ccvr_rounds: Literal["all", "last"] = CCVROptions.ccvr_rounds,
        name: str = "ccvr",
    ) -> None:
        if ccvr_covariance not in ("full", "diag"):
            raise MethodOptionError(
                f"ccvr_covariance must be 'full' or 'diag', got {ccvr_covariance!r}"
            )
        if ccvr_rounds not in ("all", "last"):
            raise MethodOptionError(f"ccvr_rounds must be 'all' or 'last', got {ccvr_rounds!r}")
        self.rounds = ccvr_rounds
        self.base = base
        self.name = name
        self.needs = base.needs | {"moments"}
        self.options: dict[str, Any] = {
            "samples_per_class": ccvr_samples,
            "epochs": ccvr_epochs,
            "lr": ccvr_lr,
            "temperature": ccvr_temperature,
        }
        self.full_covariance = ccvr_covariance == "full"

    def describe(self) -> dict[str, Any]:
        return {
            **self.base.describe(),
            "method": self.name,
            "ccvr": self.options,
            "ccvr_covariance": "full" if self.full_covariance else "diag",
            "ccvr_rounds": self.rounds,
        }

    def merge(self, updates: Sequence[ClientUpdate], ctx: MergeContext) -> AggregationResult:
        """The base method's merge (the calibration comes after, with the clients' moments)."""
        return self.base.merge(updates, ctx)

    def after_install(self, updates: Sequence[ClientUpdate], ctx: InstallContext) -> None:
        """Re-train the installed head on virtual features from the clients' moments (every
        round, or with ``ccvr_rounds="last"`` after the final one)."""
        if self.rounds == "last" and not ctx.final_round:
            return
        if ctx.clients is None:
            raise ConfigError(f"method {self.name!r} needs a client query for CCVR's moments")
        moments = ctx.clients.moments(updates, full_covariance=self.full_covariance)
        self.calibrate(ctx.head, moments, seed=ctx.seed_for("ccvr"))

    def calibrate(
        self, head: torch.nn.Linear, moments: Sequence[Mapping[str, np.ndarray]], *, seed: int
    ) -> None:
        """:meth:`refine_head` on a model's head module, in place."""
        weight, bias = self.refine_head(
            head.weight.detach(),
            None if head.bias is None else head.bias.detach(),
            moments,
            seed=seed,
        )
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)

    def refine_head(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        moments: Sequence[Mapping[str, np.ndarray]],
        *,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CCVR: pool the clients' moments, sample virtual features, re-train the head."""
        pooled = pool_moments(
            [m["mean"] for m in moments], [m["cov"] for m in moments], [m["count"] for m in moments]
        )
        feats, labels = sample_virtual_features(
            pooled, self.options["samples_per_class"], seed=seed
        )
        return retrain_head(
            weight,
            bias,
            feats.to(weight.device),
            labels.to(weight.device),
            epochs=self.options["epochs"],
            lr=self.options["lr"],
            temperature=self.options["temperature"],
            seed=seed,
        )


# The registered factories (registry.BUILTIN_METHODS); defaults are CCVROptions'. Both pass
# ``ccvr_options`` (``ccvr_samples``, ..., ``ccvr_covariance``) on to CCVRAggregator.
def ccvr(*, lora_merge: MergeMode = "product", **ccvr_options: Any) -> CCVRAggregator:
    """FedAvg, then CCVR's head calibration."""
    return CCVRAggregator(fedavg(lora_merge=lora_merge), name="ccvr", **ccvr_options)


def livar_ccvr(
    *, table: TableLike = "paper-table-a", lora_merge: MergeMode = "product", **ccvr_options: Any
) -> CCVRAggregator:
    """LIVAR, then CCVR's head calibration."""
    base = livar(table=table, lora_merge=lora_merge)
    return CCVRAggregator(base, name="livar+ccvr", **ccvr_options)
