"""Client statistics that baselines declare in their ``needs`` (computed only when needed).

* ``"gram"``: input Gram matrices ``X^T X`` of every LoRA-adapted Linear (tokens as rows) and of
  the head's ``[features, 1]`` inputs (RegMean), float64, over the local data after training.
* ``"prototypes"``: per-class mean of the pre-logit features and counts (FedProto).
* ``"fisher"``: diagonal empirical Fisher of the trainable parameters (Fisher averaging),
  from per-sample gradients of one batched backward pass (layer inputs x back-propagated
  signals, as Opacus does).
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
from livar_merge.federated.model import forward_with_features
from livar_merge.lora_view import head_module, lora_key


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
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``mean_i (d log p(y_i|x_i) / d theta)^2`` of the trainable
    parameters over up to ``max_samples`` local samples, in eval mode.

    Per-sample gradients come from one batched backward pass: in eval mode a ViT treats the
    samples of a batch independently, so the gradient of ``sum_i log p(y_i|x_i)`` with respect to
    a Linear layer's output holds, in row ``i``, sample ``i``'s own back-propagated signal ``g_i``
    ``[n, tokens, out]``; with the layer's input ``x_i`` ``[n, tokens, in]`` the per-sample
    weight gradient is ``sum_t g_it x_it^T`` and the bias gradient ``sum_t g_it`` (as Opacus
    computes them; peft's LoRA forward is not vmap-able, so ``torch.func`` is not used). Every
    trainable parameter must belong to an ``nn.Linear`` (LoRA factors and the head); a model
    with other trainable modules takes one backward pass per sample (:func:`_fisher_per_sample`).

    Keys: the parameter names of :func:`livar_merge.federated.client.lora_state` for LoRA
    factors and ``head.weight`` / ``head.bias`` for the head.
    """

    rng = np.random.default_rng(seed)
    chosen = np.asarray(indices)
    if len(chosen) > max_samples:
        chosen = np.sort(rng.permutation(chosen)[:max_samples])
    was_training = model.training
    model.eval()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    linears = _trainable_linears(model)
    covered = {id(p) for m in linears for p in m.parameters(recurse=False) if p.requires_grad}
    if covered == {id(p) for p in named.values()}:
        sums, count = _fisher_by_hooks(model, linears, source, chosen, batch_size)
    else:
        sums, count = _fisher_per_sample(model, source, chosen, batch_size)
    model.train(was_training)
    head = head_module(model)
    head_names = {id(head.weight): "head.weight"}
    if head.bias is not None:
        head_names[id(head.bias)] = "head.bias"
    return {
        head_names.get(id(param), lora_key(name)): (sums[id(param)] / max(count, 1)).cpu()
        for name, param in named.items()
    }


def _trainable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` modules with a trainable weight or bias of their own."""
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _fisher_by_hooks(
    model: torch.nn.Module,
    linears: list[torch.nn.Linear],
    source: BatchSource,
    chosen: np.ndarray,
    batch_size: int,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sums over samples of squared per-sample gradients (float64), keyed by ``id(param)``,
    from one forward and one backward pass per batch (see :func:`diagonal_fisher`)."""
    sums = {
        id(p): torch.zeros_like(p, dtype=torch.float64)
        for m in linears
        for p in m.parameters(recurse=False)
        if p.requires_grad
    }
    batch_grads: dict[int, torch.Tensor] = {}

    def add(param: torch.Tensor | None, grad: torch.Tensor) -> None:
        if param is None or not param.requires_grad:
            return
        # a layer called twice in one forward: its per-sample gradients add before squaring
        previous = batch_grads.get(id(param))
        batch_grads[id(param)] = grad if previous is None else previous + grad

    def capture(module: torch.nn.Linear, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0].detach().float()

        def on_grad(g: torch.Tensor) -> None:
            g = g.detach().float()
            x3, g3 = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            add(module.weight, torch.einsum("nto,nti->noi", g3, x3))
            add(module.bias, g3.sum(dim=1))

        if output.requires_grad:
            output.register_hook(on_grad)

    handles = [m.register_forward_hook(capture) for m in linears]
    params = [p for m in linears for p in m.parameters(recurse=False) if p.requires_grad]
    count = 0
    try:
        for x, y in source.batches(chosen, batch_size):
            batch_grads.clear()
            log_probs = torch.log_softmax(model(x).float(), dim=-1)
            picked = log_probs.gather(1, y[:, None])[:, 0]
            torch.autograd.grad(picked.sum(), params, allow_unused=True)
            for key, grad in batch_grads.items():
                sums[key] += (grad.double() ** 2).sum(dim=0)
            count += len(y)
    finally:
        for handle in handles:
            handle.remove()
    return sums, count


def _fisher_per_sample(
    model: torch.nn.Module, source: BatchSource, chosen: np.ndarray, batch_size: int
) -> tuple[dict[int, torch.Tensor], int]:
    """As :func:`_fisher_by_hooks`, with one backward pass per sample (any trainable module)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    count = 0
    for x, y in source.batches(chosen, batch_size):
        log_probs = torch.log_softmax(model(x).float(), dim=-1)
        picked = log_probs.gather(1, y[:, None])[:, 0]
        for i in range(len(y)):
            grads = torch.autograd.grad(picked[i], params, retain_graph=i < len(y) - 1)
            for param, g in zip(params, grads, strict=True):
                sums[id(param)] += g.double() ** 2
        count += len(y)
    return sums, count


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
