"""Input checks shared by the merging functions. Errors name the client, layer or key at fault."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from livar_merge.errors import ClientUpdateError

#: What the merging functions accept as an array: numpy arrays, torch tensors, nested sequences.
ArrayInput: TypeAlias = npt.ArrayLike | torch.Tensor


def client_label(index: int, client_ids: Sequence[object] | None) -> str:
    """``client 3`` or ``client 3 ('hospital-b')`` when ids are known."""
    if client_ids is not None and index < len(client_ids):
        return f"client {index} ({client_ids[index]!r})"
    return f"client {index}"


def as_float64_matrix(
    values: ArrayInput,
    what: str,
    *,
    client_ids: Sequence[object] | None = None,
    layer_names: Sequence[str] | None = None,
    nonnegative: bool = True,
) -> npt.NDArray[np.float64]:
    """Convert ``values`` to a float64 ``[clients, layers]`` array, finite (and >= 0 by default).

    The first offending entry is reported with its client and layer.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ClientUpdateError(f"{what} must be 2-D [clients, layers], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ClientUpdateError(
            f"{what} is empty (shape {array.shape}): need >= 1 client and layer"
        )
    bad = ~np.isfinite(array)
    if nonnegative:
        bad |= array < 0
    if bad.any():
        m, l = map(int, np.argwhere(bad)[0])
        layer = layer_names[l] if layer_names is not None and l < len(layer_names) else f"#{l}"
        kind = "negative" if np.isfinite(array[m, l]) else "not finite"
        raise ClientUpdateError(
            f"{what} of {client_label(m, client_ids)}, layer {layer} is {kind} "
            f"({float(array[m, l])!r}); "
            f"{int(bad.sum())} bad entries in total"
        )
    return array


def check_finite_tensor(tensor: torch.Tensor, where: str) -> None:
    """Raise if ``tensor`` holds NaN or Inf; ``where`` names client and key."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        count = int((~torch.isfinite(tensor)).sum())
        raise ClientUpdateError(f"{where} holds {count} NaN/Inf values")
