"""Class-by-class merging of classification heads (paper Eq. 6, Section 4.2).

For class ``c`` the merged row is ``H^(c) = sum_m w_m^(c) H_m^(c)`` for the weight row and the
bias entry. LIVAR uses ``w_m^(c) = sigma_m^(c) / Sigma^(c)``, the client's mean feature variance
of the class over the total; FedAvg uses the clients' sample counts for every class.

Composition: build ``class_weights [clients, classes]`` with :func:`variance_class_weights` or
:func:`sample_class_weights`, then call :func:`merge_heads`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from livar_merge._validation import ArrayInput, check_finite_tensor, client_label
from livar_merge.errors import ClientUpdateError


@dataclass(frozen=True)
class MergedHead:
    """Merged head: ``weight [C, D]``, ``bias [C]`` (or ``None``), normalised
    ``class_weights [M, C]`` and ``uncovered``: classes no client had, kept from the previous head.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    class_weights: npt.NDArray[np.float64]
    uncovered: tuple[int, ...]


def variance_class_weights(
    sigma: ArrayInput,
    present: ArrayInput,
    *,
    client_ids: Sequence[object] | None = None,
) -> npt.NDArray[np.float64]:
    """Eq. 6 weights ``sigma_m^(c) / Sigma^(c)`` as ``[clients, classes]`` (float64).

    Args:
        sigma: mean feature variances ``[clients, classes]``; entries where ``present`` is False
            are ignored (they may be NaN).
        present: bool ``[clients, classes]``, True where the client has statistics for the class.

    A class no client has gets an all-zero column (the merge keeps the previous row). A class
    whose present clients all report zero variance gets equal weights among those clients.
    """
    sig = np.asarray(
        torch.as_tensor(sigma).double().cpu() if torch.is_tensor(sigma) else sigma, dtype=np.float64
    )
    mask = np.asarray(present.cpu() if torch.is_tensor(present) else present, dtype=bool)
    if sig.ndim != 2 or mask.shape != sig.shape:
        raise ClientUpdateError(
            f"sigma {sig.shape} and present {mask.shape} must both be [clients, classes]"
        )
    bad = mask & ~(np.isfinite(sig) & (sig >= 0))
    if bad.any():
        m, c = map(int, np.argwhere(bad)[0])
        raise ClientUpdateError(
            f"feature variance of {client_label(m, client_ids)}, class {c} is "
            f"{float(sig[m, c])!r}; expected a finite value >= 0"
        )
    raw = np.where(mask, np.nan_to_num(sig), 0.0)
    totals = raw.sum(axis=0)
    degenerate = (totals == 0) & mask.any(axis=0)
    if degenerate.any():
        warnings.warn(
            f"classes {np.flatnonzero(degenerate).tolist()} have zero total feature variance; "
            "their present clients are weighted equally",
            RuntimeWarning,
            stacklevel=2,
        )
        raw[:, degenerate] = mask[:, degenerate].astype(np.float64)
        totals = raw.sum(axis=0)
    return np.divide(raw, totals, out=np.zeros_like(raw), where=totals > 0)


def sample_class_weights(num_samples: ArrayInput, num_classes: int) -> npt.NDArray[np.float64]:
    """FedAvg head weights ``n_m / sum_j n_j``, the same for every class: ``[clients, classes]``."""
    n = np.asarray(num_samples, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or not np.isfinite(n).all() or (n < 0).any() or n.sum() <= 0:
        raise ClientUpdateError(f"sample counts must be non-negative with a positive sum, got {n}")
    return np.repeat((n / n.sum())[:, None], num_classes, axis=1)


def merge_heads(
    head_weights: Sequence[torch.Tensor],
    head_biases: Sequence[torch.Tensor] | None,
    class_weights: ArrayInput,
    *,
    previous_weight: torch.Tensor | None = None,
    previous_bias: torch.Tensor | None = None,
    client_ids: Sequence[object] | None = None,
) -> MergedHead:
    """Merge heads class by class: ``H^(c) = sum_m w_m^(c) H_m^(c)`` (Eq. 6).

    Args:
        head_weights: per client ``[C, D]``; head_biases: per client ``[C]`` or ``None``.
        class_weights: ``[clients, classes]`` non-negative; each column is renormalised to sum
            to 1. An all-zero column marks a class no client covers: it keeps
            ``previous_weight``/``previous_bias`` (required then).

    Returns:
        :class:`MergedHead`; the weight and bias in the clients' dtype.
    """
    if len(head_weights) == 0:
        raise ClientUpdateError("no client heads to merge")
    ref = head_weights[0]
    if ref.ndim != 2:
        raise ClientUpdateError(
            f"head weight of client 0 must be [classes, features], got {ref.shape}"
        )
    num_classes = ref.shape[0]
    for m, w in enumerate(head_weights):
        who = client_label(m, client_ids)
        if w.shape != ref.shape or w.dtype != ref.dtype:
            raise ClientUpdateError(
                f"{who}: head weight {tuple(w.shape)} {w.dtype} differs from client 0's "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
        check_finite_tensor(w, f"{who}: head weight")
        if head_biases is not None:
            b = head_biases[m]
            if b.shape != (num_classes,):
                raise ClientUpdateError(
                    f"{who}: head bias shape {tuple(b.shape)} != ({num_classes},)"
                )
            check_finite_tensor(b, f"{who}: head bias")
    cw = np.asarray(class_weights, dtype=np.float64)
    if cw.shape != (len(head_weights), num_classes):
        raise ClientUpdateError(
            f"class weights have shape {cw.shape}; expected ({len(head_weights)}, {num_classes})"
        )
    if not np.isfinite(cw).all() or (cw < 0).any():
        m, c = map(int, np.argwhere(~np.isfinite(cw) | (cw < 0))[0])
        raise ClientUpdateError(
            f"class weight of {client_label(m, client_ids)}, class {c} is {cw[m, c]}"
        )
    totals = cw.sum(axis=0)
    covered = totals > 0
    cw = np.divide(cw, totals, out=np.zeros_like(cw), where=covered)
    uncovered = tuple(int(c) for c in np.flatnonzero(~covered))

    dtype = torch.promote_types(ref.dtype, torch.float32)
    wt = torch.as_tensor(cw, dtype=dtype, device=ref.device)  # [M, C]
    weight = torch.einsum("mc,mcd->cd", wt, torch.stack(list(head_weights)).to(dtype))
    bias = None
    if head_biases is not None:
        bias = torch.einsum("mc,mc->c", wt, torch.stack(list(head_biases)).to(dtype))
    if uncovered:
        if previous_weight is None or (head_biases is not None and previous_bias is None):
            raise ClientUpdateError(
                f"classes {list(uncovered)[:10]} have no statistics from any client and no "
                "previous head rows were given to keep"
            )
        idx = torch.tensor(uncovered, device=ref.device)
        weight[idx] = previous_weight.to(dtype)[idx]
        if bias is not None and previous_bias is not None:
            bias[idx] = previous_bias.to(dtype)[idx]
    weight = weight.to(ref.dtype)
    bias = None if bias is None else bias.to(ref.dtype)
    return MergedHead(weight=weight, bias=bias, class_weights=cw, uncovered=uncovered)
