"""Merging client LoRA modules layer by layer (paper Eq. 3).

Inputs are peft LoRA state dicts, one per client, e.g. from
``peft.get_peft_model_state_dict(model)`` (keys ``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``) or ``model.state_dict()`` (keys with the adapter name,
``<layer>.lora_A.default.weight``).
Keys that are not LoRA factors (a head in ``modules_to_save``, ...) are ignored here.

For layer ``l`` with client factors ``B_m [d, r_m]``, ``A_m [r_m, k]``, weights ``w_m`` and peft
scaling ``s`` (``lora_alpha / r``), the modes are:

``product``  exact Eq. 3: ``dW = s * sum_m w_m B_m A_m``. As stacked factors
             ``B = [w_1 B_1 | ... | w_M B_M]`` (``d x sum_m r_m``), ``A = [A_1; ...; A_M]``
             (``sum_m r_m x k``), never forming ``d x k``, or dense when ``output="dense"``.
``factors``  ``B = sum_m w_m B_m``, ``A = sum_m w_m A_m`` (FedAvg on LoRA; the released code's
             round-to-round state). ``B A`` is *not* the weighted sum of products.
``svd``      the exact product re-factorised to rank ``rank`` (default: the clients' common
             rank) by truncated SVD, computed from QR factors of the stacked factors (no
             ``d x k`` matrix); singular values are split evenly, ``B = U sqrt(S)``,
             ``A = sqrt(S) V^T``. ``LoraDelta.discarded_energy`` is the fraction of the exact
             product's squared Frobenius norm the truncation dropped.

Mixed ranks: clients may hold different ranks ``r_m`` on a layer (same ``d`` and ``k``).
``product`` is exact for any ranks (stacked rank ``sum_m r_m``); ``svd`` then needs the target
``rank`` (the server's) passed explicitly; ``factors`` needs a common rank and refuses.

Per-client scaling: by default every client's delta is ``s B_m A_m`` with the one server
scaling ``s``. When ``client_scalings`` gives client ``m``'s own peft scaling ``s_m``
(``lora_alpha_m / r_m``), it is folded into the client's factors before merging,
``B_m <- (s_m / s) B_m``, so that the merged ``LoraDelta`` keeps the server's ``scaling = s``
and, for ``product``/``svd``, ``s * B A`` (``to_dense``, or the factors of ``to_peft_state_dict``
loaded into the server's model of scaling ``s``) is ``sum_m w_m s_m B_m A_m``. ``factors``
folds the ratio into B alone, ``B = sum_m w_m (s_m / s) B_m`` and ``A = sum_m w_m A_m`` (as
Fisher averaging does), so that the ratio enters the merged product once, not squared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from livar_merge._validation import ArrayInput, check_finite_tensor, client_label
from livar_merge.errors import ClientUpdateError, ConfigError
from livar_merge.lora_view import factor_key, parse_factor_key

#: peft's LoRA scaling ``lora_alpha / r``: one number, or ``{layer: scaling}``.
ScalingInput = float | Mapping[str, float]
MergeMode = Literal["product", "factors", "svd"]
MERGE_MODES: tuple[str, ...] = ("product", "factors", "svd")


@dataclass(frozen=True)
class LoraDelta:
    """One layer's merged update ``dW = scaling * B @ A`` (``[d, k]``), or a dense ``dW``.

    Exactly one of ``(B, A)`` and ``dense`` is set. ``dense`` already includes the scaling.
    ``scaling`` is the server's (the scaling of the model the factors are loaded into), also
    when clients' own scalings were folded into the factors. ``discarded_energy`` (``svd``
    merges only, else None): the fraction ``sum_{i>rank} S_i^2 / sum_i S_i^2`` of the exact
    merged product's squared Frobenius norm that the truncation dropped (0.0 for a zero product).
    """

    scaling: float
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    discarded_energy: float | None = None

    @property
    def rank(self) -> int | None:
        return None if self.B is None else int(self.B.shape[1])

    def to_dense(self) -> torch.Tensor:
        """The ``[d, k]`` update, scaling included; from factors with :func:`exact_product`,
        so every machine that folds it gets the same bits."""
        if self.dense is not None:
            return self.dense
        assert self.B is not None and self.A is not None
        return exact_product(self.B, self.A, self.scaling)


#: elements of one block of :func:`exact_product`: below torch's intra-op grain size (32768),
#: so each small element-wise step runs on one thread, in cache, without thread hand-offs
_PRODUCT_BLOCK = 32768


def exact_product(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * B @ A`` (``B [d, R]``, ``A [R, k]`` -> ``[d, k]`` in ``B``'s dtype), with bits
    that do not depend on the CPU, GPU, BLAS kernel or thread count.

    A BLAS product sums the ``R`` terms in an order (and with FMA or not) that changes with
    the kernel a CPU selects and with the thread count, so two machines folding the same
    factors into the frozen weights (Eq. 3, ``product`` mode) differ in the last bits. Here
    each term ``B[i, r] * A[r, j]`` is formed in float64 (exact for float32 and narrower
    factors), the terms are added in the fixed order ``r = 0 .. R-1`` by element-wise float64
    additions, multiplied by ``scaling`` and rounded once to ``B``'s dtype: IEEE-754 rounds
    each element-wise operation the same on every conforming machine.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError(f"exact_product: B {tuple(B.shape)} and A {tuple(A.shape)} do not chain")
    d, rank = B.shape
    k = A.shape[1]
    b64, a64 = B.to(torch.float64), A.to(torch.float64)
    out = torch.empty((d, k), dtype=B.dtype, device=B.device)
    rows = max(1, _PRODUCT_BLOCK // max(k, 1))
    for start in range(0, d, rows):
        b = b64[start : start + rows]
        acc = torch.zeros((b.shape[0], k), dtype=torch.float64, device=B.device)
        for r in range(rank):
            acc.add_(b[:, r : r + 1] * a64[r : r + 1])  # one product per element, exact
        out[start : start + rows] = acc.mul_(scaling)
    return out


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``("blocks.0.attn.qkv", "A")`` for a LoRA factor key, ``None`` otherwise."""
    parsed = parse_factor_key(key)
    return (parsed[0], parsed[1]) if parsed else None


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

    Every client's factors of a layer must be ``B_m [d, r_m]`` and ``A_m [r_m, k]`` with the
    ``d`` and ``k`` of client 0; the rank ``r_m`` may differ between clients (use
    :func:`require_common_rank` where it may not). Raises ``ClientUpdateError`` naming the
    client and layer when keys, layer sizes, the A/B rank of one client or dtypes differ, or a
    factor is not finite.
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
        for m, table in enumerate(tables):
            who = f"{client_label(m, client_ids)}, layer {layer}"
            b, a = table[(layer, "B")], table[(layer, "A")]
            if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ClientUpdateError(
                    f"{who}: lora_B has shape {tuple(b.shape)} and lora_A {tuple(a.shape)}; "
                    "expected B [d, r] and A [r, k] (one rank r for both)"
                )
            if m == 0:
                continue
            for which, t, ref, dim, size in (("B", b, b0, 0, "d"), ("A", a, a0, 1, "k")):
                if t.shape[dim] != ref.shape[dim]:
                    raise ClientUpdateError(
                        f"{who}: lora_{which} has shape {tuple(t.shape)}, client 0 has "
                        f"{tuple(ref.shape)} (layer size {size} differs)"
                    )
                if t.dtype != ref.dtype:
                    raise ClientUpdateError(
                        f"{who}: lora_{which} has dtype {t.dtype}, client 0 has {ref.dtype}"
                    )
        for m, table in enumerate(tables):
            who = f"{client_label(m, client_ids)}, layer {layer}"
            for which in "BA":
                check_finite_tensor(table[(layer, which)], f"{who}: lora_{which}")
        lists[layer] = (
            [table[(layer, "B")] for table in tables],
            [table[(layer, "A")] for table in tables],
        )
    return lists


def factor_ranks(
    lists: Mapping[str, tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
) -> dict[str, list[int]]:
    """``{layer: [r_m]}``, the clients' ranks, of :func:`client_factor_lists`'s output."""
    return {layer: [int(b.shape[1]) for b in bs] for layer, (bs, _) in lists.items()}


def mixed_rank_message(
    what: str, layer: str, ranks: Sequence[int], client_ids: Sequence[object] | None = None
) -> str | None:
    """None when all ``ranks`` agree; else ``"<what> needs a common rank; got client 0 r=2,
    client 1 r=4 on layer L (ranks by client: 2, 4, 4)"`` (client 0 and the first that differs).
    """
    odd = next((m for m, r in enumerate(ranks) if r != ranks[0]), None)
    if odd is None:
        return None
    by_client = ", ".join(map(str, ranks[:16])) + (", ..." if len(ranks) > 16 else "")
    return (
        f"{what} needs a common rank; got {client_label(0, client_ids)} r={ranks[0]}, "
        f"{client_label(odd, client_ids)} r={ranks[odd]} on layer {layer} "
        f"(ranks by client: {by_client})"
    )


def require_common_rank(
    lists: Mapping[str, tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
    what: str,
    *,
    client_ids: Sequence[object] | None = None,
) -> None:
    """``ClientUpdateError`` (see :func:`mixed_rank_message`) at the first layer whose clients'
    ranks differ; ``what`` names the merge that needs one rank (``"method 'fisher'"``)."""
    for layer, ranks in factor_ranks(lists).items():
        message = mixed_rank_message(what, layer, ranks, client_ids)
        if message is not None:
            raise ClientUpdateError(message)


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


def scaling_for(scaling: ScalingInput, layer: str) -> float:
    """The LoRA scaling of ``layer`` from one number or a ``{layer: scaling}`` mapping."""
    if isinstance(scaling, Mapping):
        if layer not in scaling:
            raise ClientUpdateError(f"no LoRA scaling given for layer {layer}")
        return float(scaling[layer])
    return float(scaling)


def client_scaling_ratios(
    client_scalings: Sequence[ScalingInput | None],
    scaling: ScalingInput,
    layers: Sequence[str],
    client_ids: Sequence[object] | None = None,
) -> npt.NDArray[np.float64]:
    """``s_ml / s_l`` as float64 ``[clients, layers]``: client ``m``'s own peft scaling over the
    server's (1.0 where a client's entry is None). Multiplying the weight of a client's B (of
    its product ``B_m A_m``; never of both factors) by it folds its scaling into its factors,
    ``B_m <- (s_m / s) B_m``."""
    ratios = np.ones((len(client_scalings), len(layers)))
    for l, layer in enumerate(layers):
        server = scaling_for(scaling, layer)
        if not math.isfinite(server) or server == 0.0:
            raise ClientUpdateError(
                f"layer {layer}: the server's LoRA scaling is {server!r}; per-client scalings "
                "are folded in relative to it, which needs a finite non-zero value"
            )
        for m, own in enumerate(client_scalings):
            if own is None:
                continue
            who = client_label(m, client_ids)
            if isinstance(own, Mapping) and layer not in own:
                raise ClientUpdateError(f"{who}: no LoRA scaling given for layer {layer}")
            value = scaling_for(own, layer)
            if not math.isfinite(value):
                raise ClientUpdateError(f"{who}: LoRA scaling of layer {layer} is {value!r}")
            ratios[m, l] = value / server
    return ratios


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision factors are merged in float32; float32/64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def stacked_product_factors(
    factors_b: Sequence[torch.Tensor], factors_a: Sequence[torch.Tensor], w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` of rank ``R = sum_m r_m`` with ``B' A' = sum_m w_m B_m A_m``. ``w``: ``[M]``.

    ``B_m [d, r_m]``, ``A_m [r_m, k]`` (ranks may differ). ``B' = [B_1 | ... | B_M]`` ``[d, R]``
    and ``A' = [A_1; ...; A_M]`` ``[R, k]`` are built by one concatenation each; the weights
    scale, block by block, whichever of the two is smaller (in place), so the output costs one
    pass over the inputs.
    """
    b = torch.cat(list(factors_b), dim=1)
    a = torch.cat(list(factors_a), dim=0)
    ranks = [int(f.shape[1]) for f in factors_b]
    if all(r == ranks[0] for r in ranks):
        per_rank = w.repeat_interleave(ranks[0])
    else:
        per_rank = w.repeat_interleave(torch.tensor(ranks, device=w.device))
    if b.shape[0] <= a.shape[1]:
        b.mul_(per_rank)
    else:
        a.mul_(per_rank[:, None])
    return b, a


class TruncatedSvd(NamedTuple):
    """Rank-``rank`` factors ``B [d, rank]``, ``A [rank, k]`` of ``b @ a``, all its singular
    values ``S`` (float64, descending) and the discarded fraction of its squared Frobenius norm,
    ``sum_{i >= rank} S_i^2 / sum_i S_i^2`` (0.0 when ``b @ a`` is zero)."""

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor
    discarded_energy: float


def discarded_energy(singular_values: torch.Tensor, rank: int) -> float:
    """``sum_{i >= rank} S_i^2 / sum_i S_i^2`` in float64 (0.0 for all-zero ``S``)."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    return float(energy[rank:].sum()) / total if total > 0.0 else 0.0


def balanced_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [d, r], A [r, k])`` with ``B A`` the rank-``r`` truncation of ``u diag(s) vh``
    (an SVD, ``s`` descending), the singular values split evenly: ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``; ``r`` is ``rank`` capped at ``len(s)``. The one SVD split of the
    package (``svd`` merges, ``livar-export``'s re-factorisation)."""
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> TruncatedSvd:
    """Truncated SVD of ``b @ a`` without forming it (``b [d, R]``, ``a [R, k]``).

    ``B = U_r sqrt(S_r)`` ``[d, rank]``, ``A = sqrt(S_r) V_r^T`` ``[rank, k]`` (``rank`` capped
    at ``min(d, R, k)``), from QR factors of ``b`` and ``a^T`` and the SVD of the small
    ``R x R`` core, which runs in float64.
    """
    if rank < 1:
        raise ConfigError(f"the SVD target rank must be >= 1, got {rank}")
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    core = r_b.double() @ r_a.double().T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    small_b, small_a = balanced_factors(u, s, vh, rank)
    new_b = q_b @ small_b.to(q_b.dtype)
    new_a = small_a.to(q_a.dtype) @ q_a.T
    return TruncatedSvd(new_b, new_a, s, discarded_energy(s, small_a.shape[0]))


def truncated_svd_factors(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of :func:`truncated_svd` (rank-``rank`` factors of ``b @ a``)."""
    result = truncated_svd(b, a, rank)
    return result.B, result.A


def svd_target_rank(
    layer: str, ranks: Sequence[int], rank: int | None, client_ids: Sequence[object] | None
) -> int:
    """``rank`` when given, else the clients' common rank on ``layer``; a mixed-rank layer
    without ``rank`` is a ``ConfigError`` (the target is ambiguous: pass the server's rank)."""
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"the SVD target rank must be an integer >= 1, got {rank!r}")
        return rank
    message = mixed_rank_message("an svd merge without a target rank", layer, ranks, client_ids)
    if message is not None:
        raise ConfigError(f"{message}; pass rank= (the server's LoRA rank)")
    return int(ranks[0])


def merge_lora(
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: ArrayInput | Mapping[str, ArrayInput],
    *,
    mode: MergeMode = "product",
    output: Literal["factors", "dense"] = "factors",
    scaling: ScalingInput = 1.0,
    rank: int | None = None,
    layer_names: Sequence[str] | None = None,
    client_ids: Sequence[object] | None = None,
    client_scalings: Sequence[ScalingInput | None] | None = None,
) -> dict[str, LoraDelta]:
    """Merge client LoRA factors layer by layer (Eq. 3); see the module docstring for modes.

    Args:
        client_states: one peft LoRA state dict per client, all with the same layers and layer
            sizes; ranks may differ between clients except in ``factors`` mode.
        weights: ``[clients, layers]`` (LIVAR's alpha), ``[clients]`` (FedAvg), or
            ``{layer: [clients]}``; used as given (normalise beforehand).
        mode: ``"product"``, ``"factors"`` or ``"svd"``.
        output: for ``product``, stacked low-rank factors (default) or the dense ``[d, k]`` delta.
        scaling: the server's peft LoRA scaling (``lora_alpha / r``), one number or
            ``{layer: scaling}``; every client's unless ``client_scalings`` says otherwise, and
            the ``scaling`` of the returned deltas.
        rank: target rank of ``svd`` (default: the clients' common rank; required, the server's
            rank, when their ranks differ on a layer).
        layer_names: layers to merge, in the column order of ``weights`` (default: the LoRA
            layers of client 0 in its dict order).
        client_ids: names for error messages.
        client_scalings: per client, its own peft scaling (number, ``{layer: scaling}`` or None
            for the server's); folded into its factors as ``B_m <- (s_m / s) B_m`` (in
            ``factors`` mode into B only: A is averaged with the plain weights).

    Returns:
        ``{layer: LoraDelta}`` in layer order; ``svd`` deltas carry ``discarded_energy``.
        Factors come back in the compute dtype (float32 for half-precision inputs).
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
    # B's weights: w times the scaling ratios s_m / s; A's (factors mode only): w alone
    w_b = w_all
    if client_scalings is not None:
        if len(client_scalings) != len(client_states):
            raise ClientUpdateError(
                f"{len(client_scalings)} client scalings for {len(client_states)} clients"
            )
        w_b = w_all * client_scaling_ratios(client_scalings, scaling, layers, client_ids)
    if mode == "factors":
        require_common_rank(lists, "merge mode 'factors'", client_ids=client_ids)
    merged: dict[str, LoraDelta] = {}
    for l, layer in enumerate(layers):
        bs, as_ = lists[layer]
        dtype = _compute_dtype(bs[0].dtype)
        if dtype != bs[0].dtype:
            bs, as_ = [b.to(dtype) for b in bs], [a.to(dtype) for a in as_]
        w = torch.as_tensor(w_b[:, l], dtype=dtype, device=bs[0].device)
        s = scaling_for(scaling, layer)
        if mode == "factors":
            w_a = torch.as_tensor(w_all[:, l], dtype=dtype, device=bs[0].device)
            merged[layer] = LoraDelta(scaling=s, B=_weighted_sum(bs, w), A=_weighted_sum(as_, w_a))
            continue
        b, a = stacked_product_factors(bs, as_, w)
        if mode == "svd":
            target = svd_target_rank(layer, [int(f.shape[1]) for f in bs], rank, client_ids)
            svd = truncated_svd(b, a, target)
            merged[layer] = LoraDelta(
                scaling=s, B=svd.B, A=svd.A, discarded_energy=svd.discarded_energy
            )
        elif output == "dense":
            merged[layer] = LoraDelta(scaling=s, dense=exact_product(b, a, s))
        else:
            merged[layer] = LoraDelta(scaling=s, B=b, A=a)
    return merged


def svd_discarded_energies(merged: Mapping[str, LoraDelta]) -> dict[str, float]:
    """``{layer: discarded_energy}`` of the ``svd``-merged deltas of ``merged`` (empty for
    other modes); what aggregators report as ``details["svd_discarded_energy"]``."""
    return {
        layer: delta.discarded_energy
        for layer, delta in merged.items()
        if delta.discarded_energy is not None
    }


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
    state: dict[str, torch.Tensor] = {}
    for layer, delta in merged.items():
        if delta.B is None or delta.A is None:
            raise ConfigError(f"layer {layer} was merged densely; it has no LoRA factors")
        state[factor_key(layer, "A", adapter_name)] = delta.A
        state[factor_key(layer, "B", adapter_name)] = delta.B
    return state
