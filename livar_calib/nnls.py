"""Per-layer non-negative least squares on low-rank deltas (paper Eq. 4).

For one layer ``l`` of one repeat, the target coefficients are

    lambda^l = argmin_{lambda >= 0} || dW_joint^l - sum_m lambda_m dW_m^l ||_F^2        (Eq. 4)

With ``X = [vec dW_1, ..., vec dW_M]`` and ``y = vec dW_joint`` the objective is
``lambda^T G lambda - 2 lambda^T h + c`` with the Gram matrix ``G = X^T X`` ``[M, M]``,
``h = X^T y`` ``[M]`` and ``c = ||y||^2``. All three are computed from the LoRA factors
(``dW = U @ V``) without forming any ``d x k`` matrix: ``<U_a V_a, U_b V_b>_F =
sum((U_a^T U_b) * (V_a V_b^T))``, which costs ``O((d + k) R^2)`` instead of ``O(d k R)``.

The problem is then solved as a *small* dense NNLS with the same minimisers: if ``G = L L^T``
(Cholesky), ``||L^T lambda - L^{-1} h||^2 = lambda^T G lambda - 2 lambda^T h + h^T G^{-1} h``,
i.e. Eq. 4's objective up to a constant. (``nnls(G, h)`` would minimise ``||G lambda - h||^2``,
a different problem, and is not used.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from livar_calib.deltas import Factors, RepeatDeltas
from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_RANK_RTOL = 1e-10
"""Eigenvalues of ``G`` at or below ``DEFAULT_RANK_RTOL * max eigenvalue`` count as zero.

``G = X^T X`` squares the condition number of the stacked deltas, so this treats sets of deltas
whose condition number exceeds about 1e5 as rank-deficient. float64 eigenvalues of ``G`` carry an
absolute error of about ``2e-16 * max eigenvalue``, far below the threshold, so exactly singular
Grams (zero or duplicated clients, more clients than dimensions) are always detected.
"""


def _as_factors(factors: Factors, what: str) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(factors[0], dtype=np.float64)
    v = np.asarray(factors[1], dtype=np.float64)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
        raise CalibrationError(
            f"{what}: expected U [d, R] and V [R, k], got shapes {u.shape} and {v.shape}"
        )
    return u, v


def _inner64(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    (ua, va), (ub, vb) = a, b
    if ua.shape[0] != ub.shape[0] or va.shape[1] != vb.shape[1]:
        raise CalibrationError(
            f"deltas of different shapes: ({ua.shape[0]} x {va.shape[1]}) vs "
            f"({ub.shape[0]} x {vb.shape[1]})"
        )
    return float(np.sum((ua.T @ ub) * (va @ vb.T)))


def lowrank_inner(a: Factors, b: Factors) -> float:
    """Frobenius inner product ``<U_a V_a, U_b V_b>_F`` in float64, never forming ``d x k``.

    Computed as ``sum((U_a^T U_b) * (V_a V_b^T))``; ``U [d, R]``, ``V [R, k]`` (ranks may differ).
    """
    return _inner64(_as_factors(a, "first delta"), _as_factors(b, "second delta"))


def lowrank_gram(factors: Sequence[Factors]) -> np.ndarray:
    """Gram matrix ``G[i, j] = <dW_i, dW_j>_F`` ``[M, M]`` (float64, exactly symmetric)."""
    fs = [_as_factors(f, f"client {m}") for m, f in enumerate(factors)]
    gram = np.zeros((len(fs), len(fs)))
    for i in range(len(fs)):
        for j in range(i, len(fs)):
            gram[i, j] = gram[j, i] = _inner64(fs[i], fs[j])
    return gram


def lowrank_cross(factors: Sequence[Factors], joint: Factors) -> np.ndarray:
    """``h[m] = <dW_m, dW_joint>_F`` ``[M]`` (float64)."""
    target = _as_factors(joint, "joint")
    return np.array(
        [_inner64(_as_factors(f, f"client {m}"), target) for m, f in enumerate(factors)]
    )


def lowrank_sqnorm(joint: Factors) -> float:
    """``c = ||dW_joint||_F^2`` (float64)."""
    target = _as_factors(joint, "joint")
    return _inner64(target, target)


def normal_equations(
    client_factors: Sequence[Factors], joint_factors: Factors
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(G [M, M], h [M], c)`` of Eq. 4 for one layer, from low-rank factors.

    All ``M + 1`` deltas at once: with ``U = [U_1 | ... | U_M | U_joint]`` and
    ``V = [V_1; ...; V_M; V_joint]``, ``<dW_i, dW_j> = sum of block (i, j) of
    (U^T U) * (V V^T)``: two float64 matrix products, never a ``d x k`` matrix.
    """
    fs = [_as_factors(f, f"client {m}") for m, f in enumerate(client_factors)]
    fs.append(_as_factors(joint_factors, "joint"))
    shapes = {(u.shape[0], v.shape[1]) for u, v in fs}
    if len(shapes) != 1:
        raise CalibrationError(f"deltas of different shapes: {sorted(shapes)}")
    if any(u.shape[1] == 0 for u, _ in fs):  # reduceat cannot express an empty block
        return (
            lowrank_gram(client_factors),
            lowrank_cross(client_factors, joint_factors),
            lowrank_sqnorm(joint_factors),
        )
    u_all = np.concatenate([u for u, _ in fs], axis=1)
    v_all = np.concatenate([v for _, v in fs], axis=0)
    products = (u_all.T @ u_all) * (v_all @ v_all.T)
    offsets = np.cumsum([0] + [u.shape[1] for u, _ in fs[:-1]])
    full = np.add.reduceat(np.add.reduceat(products, offsets, axis=0), offsets, axis=1)
    full = (full + full.T) / 2
    m = len(fs) - 1
    return full[:m, :m].copy(), full[:m, m].copy(), float(full[m, m])


def gram_objective(weights: np.ndarray, gram: np.ndarray, h: np.ndarray, c: float) -> float:
    """``||dW_joint - sum_m w_m dW_m||_F^2 = c - 2 w.h + w^T G w``, clipped at 0."""
    w = np.asarray(weights, dtype=np.float64)
    return max(float(c - 2.0 * (w @ h) + w @ gram @ w), 0.0)


@dataclass(frozen=True)
class NNLSResult:
    """Solution of Eq. 4 for one layer.

    Attributes:
        lam: ``[M]`` non-negative coefficients.
        residual_sq: ``||dW_joint - sum lam_m dW_m||_F^2`` (Gram identity, clipped at 0).
        relative_residual: ``residual_sq / ||dW_joint||_F^2`` (0 when the joint delta is 0).
        gram_rank: numerical rank of ``G`` (eigenvalues above ``rank_rtol * max``).
        rank_deficient: ``gram_rank < M``; the minimiser may then not be unique.
        method: ``"cholesky"`` or ``"eigen"`` (square root used for the reduced problem).
        excluded: clients given ``lam = 0`` up front: zero deltas and duplicates of an
            earlier client.
    """

    lam: np.ndarray
    residual_sq: float
    relative_residual: float
    gram_rank: int
    rank_deficient: bool
    method: str
    excluded: tuple[int, ...] = ()


def numerical_rank(gram: np.ndarray, rank_rtol: float = DEFAULT_RANK_RTOL) -> int:
    """Number of eigenvalues of the Gram matrix above ``rank_rtol`` times the largest."""
    if gram.size == 0:
        return 0
    eig = np.linalg.eigvalsh(gram)
    top = eig.max()
    if not top > 0:
        return 0
    return int(np.sum(eig > rank_rtol * top))


def _redundant_clients(gram: np.ndarray, rank_rtol: float) -> list[int]:
    """Clients with a zero delta, or (numerically) equal to an earlier kept client."""
    diag = np.diag(gram)
    scale = diag.max(initial=0.0)
    kept: list[int] = []
    dropped: list[int] = []
    for m in range(len(diag)):
        if not diag[m] > rank_rtol * scale:
            dropped.append(m)
            continue
        for j in kept:
            dist_sq = diag[m] + diag[j] - 2.0 * gram[m, j]  # ||dW_m - dW_j||^2
            if dist_sq <= rank_rtol * max(diag[m], diag[j]):
                dropped.append(m)
                break
        else:
            kept.append(m)
    return dropped


def _square_root_system(
    gram: np.ndarray, h: np.ndarray, rank_rtol: float
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(A, b)`` with ``A^T A = G`` and ``A^T b = h`` (projected on range(G)), and the method."""
    import scipy.linalg

    eig = np.linalg.eigvalsh(gram)
    if eig.min() > rank_rtol * eig.max():
        try:
            low = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            pass
        else:
            return low.T, scipy.linalg.solve_triangular(low, h, lower=True), "cholesky"
    # Symmetric square root on the positive eigen-directions: R = Q_+ diag(sqrt w_+) Q_+^T,
    # R^T R = G restricted to range(G); t = R^+ h is the least-squares solution of R^T t = h.
    w, q = np.linalg.eigh(gram)
    keep = w > rank_rtol * w.max()
    qk, wk = q[:, keep], w[keep]
    root = (qk * np.sqrt(wk)) @ qk.T
    t = qk @ ((qk.T @ h) / np.sqrt(wk))
    return root, t, "eigen"


def nnls_gram(
    gram: np.ndarray, h: np.ndarray, c: float, *, rank_rtol: float = DEFAULT_RANK_RTOL
) -> NNLSResult:
    """Solve Eq. 4 given ``G [M, M]``, ``h [M]``, ``c`` (see :func:`nnls_lowrank`)."""
    from scipy.optimize import nnls

    gram = np.asarray(gram, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1:
        raise CalibrationError(f"h must be 1-D [M], got shape {h.shape}")
    m_count = h.shape[0]
    if gram.shape != (m_count, m_count):
        raise CalibrationError(f"Gram matrix has shape {gram.shape}, expected {(m_count,) * 2}")
    if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(h)) and np.isfinite(c)):
        raise CalibrationError("Gram matrix, cross products or joint norm are not finite")
    rank = numerical_rank(gram, rank_rtol)
    excluded = _redundant_clients(gram, rank_rtol)
    active = [m for m in range(m_count) if m not in excluded]
    lam = np.zeros(m_count)
    method = "none"
    if active:
        sub = gram[np.ix_(active, active)]
        matrix, rhs, method = _square_root_system(sub, h[active], rank_rtol)
        lam[active], _ = nnls(matrix, rhs)
    residual = gram_objective(lam, gram, h, c)
    relative = residual / c if c > 0 else 0.0
    return NNLSResult(
        lam=lam,
        residual_sq=residual,
        relative_residual=relative,
        gram_rank=rank,
        rank_deficient=rank < m_count,
        method=method,
        excluded=tuple(excluded),
    )


def nnls_lowrank(
    client_factors: Sequence[Factors],
    joint_factors: Factors,
    *,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> NNLSResult:
    """Eq. 4 for one layer from LoRA factors: ``lambda = argmin_{>=0} ||dW_joint - sum lam dW||``.

    Args:
        client_factors: ``M`` pairs ``(U_m [d, R_m], V_m [R_m, k])`` with ``dW_m = U_m @ V_m``.
        joint_factors: ``(U [d, R], V [R, k])`` of the joint delta.
        rank_rtol: eigenvalue threshold relative to the largest (see ``DEFAULT_RANK_RTOL``).

    Full-rank Gram: ``G = L L^T`` and ``scipy.optimize.nnls(L^T, L^{-1} h)``; the minimiser is
    unique and equals the dense solution of :func:`nnls_dense`.

    Rank-deficient Gram (``rank_deficient=True``), where the minimiser need not be unique, the
    returned solution is fixed by these deterministic rules:

    1. a client with a zero delta gets ``lam = 0``;
    2. a client whose delta equals an earlier client's (``||dW_m - dW_j||^2 <= rank_rtol *
       max(||dW_m||^2, ||dW_j||^2)``, ``j < m``) gets ``lam = 0``: the earlier one carries the
       weight of both;
    3. the remaining clients are solved with scipy's Lawson-Hanson active-set NNLS on the
       symmetric square root ``R = Q_+ diag(sqrt w_+) Q_+^T`` of their Gram (positive
       eigen-directions only, ``R^T R = G``) and ``t`` the least-squares solution of
       ``R^T t = h``. Starting from ``lam = 0`` it adds one client at a time (largest gradient
       first), so it returns a sparse minimiser.

    Every returned ``lam`` attains the minimum of Eq. 4 (up to the rounding the tolerance allows).
    """
    gram, h, c = normal_equations(client_factors, joint_factors)
    return nnls_gram(gram, h, c, rank_rtol=rank_rtol)


def nnls_dense(client_dense: np.ndarray, joint_dense: np.ndarray) -> np.ndarray:
    """Reference solution of Eq. 4: ``scipy.optimize.nnls`` on the ``(d*k) x M`` problem.

    Args:
        client_dense: ``[M, d, k]`` client deltas.
        joint_dense: ``[d, k]`` joint delta.
    Returns ``lam [M]``.
    """
    from scipy.optimize import nnls

    clients = np.asarray(client_dense, dtype=np.float64)
    joint = np.asarray(joint_dense, dtype=np.float64)
    if clients.ndim != 3 or clients.shape[1:] != joint.shape:
        raise CalibrationError(
            f"client deltas {clients.shape} must be [M, d, k] with [d, k] = joint {joint.shape}"
        )
    lam, _ = nnls(clients.reshape(clients.shape[0], -1).T, joint.reshape(-1))
    return lam


def nnls_repeat(deltas: RepeatDeltas, *, rank_rtol: float = DEFAULT_RANK_RTOL) -> pd.DataFrame:
    """Eq. 4 for every layer of a repeat.

    Returns one row per (client, layer) with columns ``repeat_id, client, layer, lam,
    relative_residual, rank_deficient`` (the last two are per layer, repeated over clients).
    """
    import pandas as pd

    deltas.validate()
    records = []
    for layer in deltas.layers:
        result = nnls_lowrank(
            deltas.client_factors[layer], deltas.joint_factors[layer], rank_rtol=rank_rtol
        )
        for m, client in enumerate(deltas.clients):
            records.append(
                {
                    "repeat_id": deltas.repeat_id,
                    "client": client,
                    "layer": layer,
                    "lam": float(result.lam[m]),
                    "relative_residual": result.relative_residual,
                    "rank_deficient": result.rank_deficient,
                }
            )
    return pd.DataFrame.from_records(records)
