"""Merging client LoRA modules layer by layer (paper Eq. 3).

Inputs are peft LoRA state dicts, one per client, e.g. from
``peft.get_peft_model_state_dict(model)`` (keys ``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``) or ``model.state_dict()`` (keys with the adapter name,
``<layer>.lora_A.default.weight``).
Keys that are not LoRA factors (a head in ``modules_to_save``, ...) are ignored here.

For layer ``l`` with client factors ``B_m [d, r]``, ``A_m [r, k]``, weights ``w_m`` and peft
scaling ``s`` (``lora_alpha / r``), the modes are:

``product``  exact Eq. 3: ``dW = s * sum_m w_m B_m A_m``. As stacked factors
             ``B = [w_1 B_1 | ... | w_M B_M]`` (``d x Mr``), ``A = [A_1; ...; A_M]`` (``Mr x k``),
             never forming ``d x k``, or dense when ``output="dense"``.
``factors``  ``B = sum_m w_m B_m``, ``A = sum_m w_m A_m`` (FedAvg on LoRA; the released code's
             round-to-round state). ``B A`` is *not* the weighted sum of products.
``svd``      the exact product re-factorised to rank ``rank`` (default ``r``) by truncated SVD,
             computed from QR factors of the stacked factors (no ``d x k`` matrix); singular
             values are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from livar_merge._validation import ArrayInput, check_finite_tensor, client_label
from livar_merge.errors import ClientUpdateError, ConfigError

MergeMode = Literal["product", "factors", "svd"]
MERGE_MODES: tuple[str, ...] = ("product", "factors", "svd")
_LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraDelta:
    """One layer's merged update ``dW = scaling * B @ A`` (``[d, k]``), or a dense ``dW``.

    Exactly one of ``(B, A)`` and ``dense`` is set. ``dense`` already includes the scaling.
    """

    scaling: float
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.B is None else int(self.B.shape[1])

    def to_dense(self) -> torch.Tensor:
        """The ``[d, k]`` update, scaling included."""
        if self.dense is not None:
            return self.dense
        assert self.B is not None and self.A is not None
        return (self.B @ self.A) * self.scaling


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``("blocks.0.attn.qkv", "A")`` for a LoRA factor key, ``None`` otherwise."""
    match = _LORA_KEY.match(key)
    return (match["layer"], match["which"]) if match else None


def lora_layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """LoRA layers of a state dict, in the dict's order; each must have both A and B."""
    seen: dict[str, set[str]] = {}
    for key in state:
        parsed = parse_lora_key(key)
        if parsed:
            seen.setdefault(parsed[0], set()).add(parsed[1])
    incomplete = [layer for layer, which in seen.items() if which != {"A", "B"}]
    if incomplete:
        raise ClientUpdateError(f"LoRA layers without both A and B factors: {incomplete[:5]}")
    return list(seen)


def _factor_table(state: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    table: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in state.items():
        parsed = parse_lora_key(key)
        if parsed:
            if parsed in table:
                raise ClientUpdateError(f"two LoRA entries for {parsed} (several adapters?): {key}")
            table[parsed] = value
    return table


def client_factor_lists(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    client_ids: Sequence[object] | None = None,
    layer_names: Sequence[str] | None = None,
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Check the client state dicts agree; ``{layer: ([B_m], [A_m])}`` (no copies).

    Raises ``ClientUpdateError`` naming the client and layer when keys, shapes, ranks or dtypes
    differ from client 0, or a factor is not finite.
    """
    if len(client_states) == 0:
        raise ClientUpdateError("no client LoRA states to merge")
    tables = [_factor_table(state) for state in client_states]
    layers = list(layer_names) if layer_names is not None else lora_layer_names(client_states[0])
    if not layers:
        raise ClientUpdateError("client 0's state dict holds no LoRA factors (lora_A/lora_B keys)")
    expected = {(layer, which) for layer in layers for which in "AB"}
    for m, table in enumerate(tables):
        who = client_label(m, client_ids)
        missing, extra = expected - table.keys(), table.keys() - expected
        if missing or extra:
            raise ClientUpdateError(
                f"{who}: LoRA keys differ from the expected layers: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
    lists: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for layer in layers:
        b0, a0 = tables[0][(layer, "B")], tables[0][(layer, "A")]
        if b0.ndim != 2 or a0.ndim != 2 or b0.shape[1] != a0.shape[0]:
            raise ClientUpdateError(
                f"{client_label(0, client_ids)}, layer {layer}: expected B [d, r] and A [r, k], "
                f"got B {tuple(b0.shape)} and A {tuple(a0.shape)}"
            )
        for m, table in enumerate(tables):
            who = f"{client_label(m, client_ids)}, layer {layer}"
            for which, ref in (("B", b0), ("A", a0)):
                t = table[(layer, which)]
                if t.shape != ref.shape:
                    raise ClientUpdateError(
                        f"{who}: lora_{which} has shape {tuple(t.shape)}, client 0 has "
                        f"{tuple(ref.shape)} (rank or layer size differs)"
                    )
                if t.dtype != ref.dtype:
                    raise ClientUpdateError(
                        f"{who}: lora_{which} has dtype {t.dtype}, client 0 has {ref.dtype}"
                    )
                check_finite_tensor(t, f"{who}: lora_{which}")
        lists[layer] = (
            [table[(layer, "B")] for table in tables],
            [table[(layer, "A")] for table in tables],
        )
    return lists


def _weight_matrix(
    weights: ArrayInput | Mapping[str, ArrayInput],
    num_clients: int,
    layers: Sequence[str],
    client_ids: Sequence[object] | None,
) -> npt.NDArray[np.float64]:
    """Weights as float64 ``[clients, layers]``: from ``[M, L]``, ``[M]`` or ``{layer: [M]}``."""
    if isinstance(weights, Mapping):
        missing = [layer for layer in layers if layer not in weights]
        if missing:
            raise ClientUpdateError(f"no merge weights for layers {missing[:5]}")
        weights = np.stack([np.asarray(weights[layer], dtype=np.float64) for layer in layers], 1)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().double().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.repeat(w[:, None], len(layers), axis=1)
    if w.shape != (num_clients, len(layers)):
        raise ClientUpdateError(
            f"merge weights have shape {w.shape}; expected ({num_clients} clients, "
            f"{len(layers)} layers) or ({num_clients},)"
        )
    if not np.isfinite(w).all():
        m, l = map(int, np.argwhere(~np.isfinite(w))[0])
        raise ClientUpdateError(
            f"merge weight of {client_label(m, client_ids)}, layer {layers[l]} is "
            f"{float(w[m, l])!r}"
        )
    return w


def scaling_for(scaling: float | Mapping[str, float], layer: str) -> float:
    """The LoRA scaling of ``layer`` from one number or a ``{layer: scaling}`` mapping."""
    if isinstance(scaling, Mapping):
        if layer not in scaling:
            raise ClientUpdateError(f"no LoRA scaling given for layer {layer}")
        return float(scaling[layer])
    return float(scaling)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision factors are merged in float32; float32/64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def stacked_product_factors(
    factors_b: Sequence[torch.Tensor], factors_a: Sequence[torch.Tensor], w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` of rank ``M r`` with ``B' A' = sum_m w_m B_m A_m``. ``w``: ``[M]``.

    ``B' = [B_1 | ... | B_M]`` and ``A' = [A_1; ...; A_M]`` are built by one concatenation each;
    the weights scale whichever of the two is smaller (in place), so the output costs one pass
    over the inputs.
    """
    b = torch.cat(list(factors_b), dim=1)
    a = torch.cat(list(factors_a), dim=0)
    per_rank = w.repeat_interleave(factors_b[0].shape[1])
    if b.shape[0] <= a.shape[1]:
        b.mul_(per_rank)
    else:
        a.mul_(per_rank[:, None])
    return b, a


def truncated_svd_factors(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of the truncated SVD of ``b @ a`` without forming it.

    ``b [d, R]``, ``a [R, k]``; returns ``U_r sqrt(S_r)`` ``[d, rank]`` and ``sqrt(S_r) V_r^T``
    ``[rank, k]``. The small core SVD runs in float64.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    core = r_b.double() @ r_a.double().T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    new_b = q_b @ (u[:, :rank] * root).to(q_b.dtype)
    new_a = (root[:, None] * vh[:rank]).to(q_a.dtype) @ q_a.T
    return new_b, new_a


def merge_lora(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: ArrayInput | Mapping[str, ArrayInput],
    *,
    mode: MergeMode = "product",
    output: Literal["factors", "dense"] = "factors",
    scaling: float | Mapping[str, float] = 1.0,
    rank: int | None = None,
    layer_names: Sequence[str] | None = None,
    client_ids: Sequence[object] | None = None,
) -> dict[str, LoraDelta]:
    """Merge client LoRA factors layer by layer (Eq. 3); see the module docstring for modes.

    Args:
        client_states: one peft LoRA state dict per client, all with the same layers and shapes.
        weights: ``[clients, layers]`` (LIVAR's alpha), ``[clients]`` (FedAvg), or
            ``{layer: [clients]}``; used as given (normalise beforehand).
        mode: ``"product"``, ``"factors"`` or ``"svd"``.
        output: for ``product``, stacked low-rank factors (default) or the dense ``[d, k]`` delta.
        scaling: peft's LoRA scaling (``lora_alpha / r``), one number or ``{layer: scaling}``.
        rank: target rank of ``svd`` (default: the clients' rank).
        layer_names: layers to merge, in the column order of ``weights`` (default: the LoRA
            layers of client 0 in its dict order).

    Returns:
        ``{layer: LoraDelta}`` in layer order. Factors come back in the compute dtype
        (float32 for half-precision inputs).
    """
    if mode not in MERGE_MODES:
        raise ConfigError(f"unknown LoRA merge mode {mode!r}; choose from {MERGE_MODES}")
    if output not in ("factors", "dense"):
        raise ConfigError(f"output must be 'factors' or 'dense', got {output!r}")
    if output == "dense" and mode != "product":
        raise ConfigError(f"output='dense' applies to mode='product' only (got mode={mode!r})")
    lists = client_factor_lists(client_states, client_ids=client_ids, layer_names=layer_names)
    layers = list(lists)
    w_all = _weight_matrix(weights, len(client_states), layers, client_ids)
    merged: dict[str, LoraDelta] = {}
    for l, layer in enumerate(layers):
        bs, as_ = lists[layer]
        dtype = _compute_dtype(bs[0].dtype)
        if dtype != bs[0].dtype:
            bs, as_ = [b.to(dtype) for b in bs], [a.to(dtype) for a in as_]
        w = torch.as_tensor(w_all[:, l], dtype=dtype, device=bs[0].device)
        s = scaling_for(scaling, layer)
        if mode == "factors":
            merged[layer] = LoraDelta(scaling=s, B=_weighted_sum(bs, w), A=_weighted_sum(as_, w))
            continue
        b, a = stacked_product_factors(bs, as_, w)
        if mode == "svd":
            b, a = truncated_svd_factors(b, a, rank or int(bs[0].shape[1]))
            merged[layer] = LoraDelta(scaling=s, B=b, A=a)
        elif output == "dense":
            merged[layer] = LoraDelta(scaling=s, dense=torch.mm(b, a).mul_(s))
        else:
            merged[layer] = LoraDelta(scaling=s, B=b, A=a)
    return merged


def _weighted_sum(tensors: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``sum_m w_m T_m`` accumulated in place (no stacked copy of the inputs)."""
    out = tensors[0] * w[0]
    for m in range(1, len(tensors)):
        out.add_(tensors[m], alpha=float(w[m]))
    return out


def to_peft_state_dict(
    merged: Mapping[str, LoraDelta], *, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """LoRA state dict of merged factors (``factors``/``svd`` modes, or ``product`` factors).

    Keys follow ``get_peft_model_state_dict`` (``<layer>.lora_A.weight``), or carry
    ``adapter_name`` as in ``model.state_dict()``. Load with ``set_peft_model_state_dict``.
    """
    infix = f".{adapter_name}" if adapter_name else ""
    state: dict[str, torch.Tensor] = {}
    for layer, delta in merged.items():
        if delta.B is None or delta.A is None:
            raise ConfigError(f"layer {layer} was merged densely; it has no LoRA factors")
        state[f"{layer}.lora_A{infix}.weight"] = delta.A
        state[f"{layer}.lora_B{infix}.weight"] = delta.B
    return state


def peft_scalings(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """``{layer: scaling}`` of a peft model's LoRA layers (``lora_alpha / r``, or rsLoRA's)."""
    scalings = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling and hasattr(module, "lora_A"):
            scalings[name] = float(scaling[adapter_name])
    return scalings
