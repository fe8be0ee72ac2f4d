"""Client statistics that baselines declare in their ``needs`` (computed only when needed).

* ``"gram"``: input Gram matrices ``X^T X`` of every LoRA-adapted Linear (tokens as rows) and of
  the head's ``[features, 1]`` inputs (RegMean), float64, over the local data after training.
* ``"prototypes"``: per-class mean of the pre-logit features and counts (FedProto).
* ``"fisher"``: diagonal empirical Fisher of the trainable parameters (Fisher averaging),
  from per-sample gradients (``torch.func``).
* ``"moments"``: per-class feature mean, covariance (full or diagonal) and count under a given
  (global) model (CCVR).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from livar_merge.federated.data import BatchSource
from livar_merge.federated.model import forward_with_features, head_module
from livar_merge.federated.peft_keys import lora_key


@contextlib.contextmanager
def input_gram_hooks(model: torch.nn.Module, layers: list[str]) -> Iterator[dict[str, Any]]:
    """Accumulate ``X^T X`` (float64) of the inputs of ``layers`` while the context is open."""
    modules = dict(model.named_modules())
    grams: dict[str, Any] = {}

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def accumulate(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            gram = x.T @ x
            grams[name] = gram if name not in grams else grams[name] + gram

        return accumulate

    handles = [modules[layer].register_forward_pre_hook(hook(layer)) for layer in layers]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def gram_and_prototype_pass(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    num_classes: int,
    *,
    layers: list[str],
    batch_size: int,
    want_gram: bool,
    want_prototypes: bool,
) -> dict[str, Any]:
    """One inference pass over the client's data collecting Grams and/or prototypes."""
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    head_gram: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    context: contextlib.AbstractContextManager[dict[str, Any]] = (
        input_gram_hooks(model, layers) if want_gram else contextlib.nullcontext({})
    )
    with context as grams:
        for x, y in source.batches(indices, batch_size):
            features, _ = forward_with_features(model, x)
            f = features.double()
            if want_gram:
                aug = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
                g = aug.T @ aug
                head_gram = g if head_gram is None else head_gram + g
            if want_prototypes:
                if sums is None or counts is None:
                    sums = torch.zeros(
                        num_classes, f.shape[1], dtype=torch.float64, device=f.device
                    )
                    counts = torch.zeros(num_classes, dtype=torch.float64, device=f.device)
                sums.index_add_(0, y, f)
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    model.train(was_training)
    if want_gram:
        assert head_gram is not None  # set by the first batch
        out["gram"] = {layer: g.cpu() for layer, g in grams.items()}
        out["head_gram"] = head_gram.cpu()
    if want_prototypes:
        assert sums is not None and counts is not None
        mean = (sums / counts.clamp(min=1)[:, None]).cpu().numpy()
        mean[counts.cpu().numpy() == 0] = np.nan
        out["proto_mean"] = mean
        out["proto_count"] = counts.cpu().numpy()
    return out


def diagonal_fisher(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    *,
    max_samples: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``mean_i (d log p(y_i|x_i) / d theta)^2`` of the trainable
    parameters over up to ``max_samples`` local samples (one backward pass per sample, in eval
    mode; peft's LoRA forward is not vmap-able, so ``torch.func`` per-sample gradients are not
    used).

    Keys: the parameter names of :func:`livar_merge.federated.client.lora_state` for LoRA
    factors and ``head.weight`` / ``head.bias`` for the head.
    """

    rng = np.random.default_rng(seed)
    chosen = np.asarray(indices)
    if len(chosen) > max_samples:
        chosen = np.sort(rng.permutation(chosen)[:max_samples])
    was_training = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = 0
    for x, y in source.batches(chosen, 32):
        log_probs = torch.log_softmax(model(x).float(), dim=-1)
        picked = log_probs.gather(1, y[:, None])[:, 0]
        for i in range(len(y)):
            grads = torch.autograd.grad(picked[i], params, retain_graph=i < len(y) - 1)
            for total, g in zip(sums, grads, strict=True):
                total += g.double() ** 2
        count += len(y)
    model.train(was_training)
    head = head_module(model)
    head_names = {id(head.weight): "head.weight"}
    if head.bias is not None:
        head_names[id(head.bias)] = "head.bias"
    out = {}
    for name, param, total in zip(names, params, sums, strict=True):
        out[head_names.get(id(param), lora_key(name))] = (total / max(count, 1)).cpu()
    return out


@torch.no_grad()
def feature_moments(
    model: torch.nn.Module,
    source: BatchSource,
    indices: np.ndarray,
    num_classes: int,
    *,
    batch_size: int,
    full_covariance: bool = True,
) -> dict[str, np.ndarray]:
    """Per-class ``mean [C, D]``, unbiased ``cov [C, D, D]`` (or ``[C, D]``) and ``count [C]``
    of the pre-logit features of ``model`` over the client's data (CCVR)."""
    was_training = model.training
    model.eval()
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    n: torch.Tensor | None = None
    for x, y in source.batches(indices, batch_size):
        features, _ = forward_with_features(model, x)
        f = features.double()
        if s1 is None or s2 is None or n is None:
            d = f.shape[1]
            s1 = torch.zeros(num_classes, d, dtype=torch.float64, device=f.device)
            shape = (num_classes, d, d) if full_covariance else (num_classes, d)
            s2 = torch.zeros(shape, dtype=torch.float64, device=f.device)
            n = torch.zeros(num_classes, dtype=torch.float64, device=f.device)
        s1.index_add_(0, y, f)
        n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        outer = f[:, :, None] * f[:, None, :] if full_covariance else f**2
        s2.index_add_(0, y, outer)
    model.train(was_training)
    assert s1 is not None and s2 is not None and n is not None
    count = n.cpu().numpy()
    mean = (s1 / n.clamp(min=1)[:, None]).cpu().numpy()
    second = s2.cpu().numpy()
    denom = np.maximum(count - 1, 1)
    if full_covariance:
        cov = (second - count[:, None, None] * np.einsum("cd,ce->cde", mean, mean)) / denom[
            :, None, None
        ]
    else:
        cov = (second - count[:, None] * mean**2) / denom[:, None]
    return {"mean": mean, "cov": cov, "count": count}
