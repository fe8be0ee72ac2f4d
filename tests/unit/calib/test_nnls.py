"""Low-rank inner products and NNLS (livar_calib.nnls) against dense computations."""

from __future__ import annotations

import numpy as np
import pytest

from livar_calib.nnls import (
    lowrank_cross,
    lowrank_gram,
    lowrank_inner,
    lowrank_sqnorm,
    nnls_dense,
    nnls_lowrank,
    nnls_repeat,
)
from tests.helpers import factors, random_repeat


def dense(f: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.asarray(f[0], dtype=np.float64) @ np.asarray(f[1], dtype=np.float64)


def dense_objective(lam: np.ndarray, clients: np.ndarray, joint: np.ndarray) -> float:
    return float(np.sum((joint - np.tensordot(lam, clients, axes=1)) ** 2))


# ----------------------------------------------------------------------------------- NNLS
def test_lowrank_inner_and_gram_match_dense(rng):
    d, k = 37, 23
    fs = [factors(rng, d, k, r) for r in (1, 3, 6, 4)]
    joint = factors(rng, d, k, 5)
    ds = [dense(f) for f in fs]
    for i, a in enumerate(fs):
        for j, b in enumerate(fs):
            expected = np.sum(ds[i] * ds[j])
            assert lowrank_inner(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    gram = lowrank_gram(fs)
    np.testing.assert_allclose(gram, [[np.sum(a * b) for b in ds] for a in ds], rtol=1e-12)
    assert np.array_equal(gram, gram.T)
    np.testing.assert_allclose(lowrank_cross(fs, joint), [np.sum(a * dense(joint)) for a in ds])
    assert lowrank_sqnorm(joint) == pytest.approx(np.sum(dense(joint) ** 2), rel=1e-12)
    # float32 factors are accumulated in float64
    f32 = [(u.astype(np.float32), v.astype(np.float32)) for u, v in fs[:2]]
    exact = np.sum(dense(f32[0]) * dense(f32[1]))
    assert lowrank_inner(*f32) == pytest.approx(exact, rel=1e-12)


def planted_layer(rng, m_count, *, negative=True, noise=0.05):
    d, k = (int(x) for x in rng.integers(20, 61, size=2))
    fs = [factors(rng, d, k, int(rng.integers(2, 7))) for _ in range(m_count)]
    lam = rng.uniform(0.0, 1.0, m_count)
    lam[rng.random(m_count) < 0.3] = 0.0
    if negative:
        lam[rng.permutation(m_count)[: max(1, m_count // 3)]] *= -1.0  # active constraints
    noise_f = factors(rng, d, k, 2)
    joint = (
        np.concatenate([lam[m] * fs[m][0] for m in range(m_count)] + [noise * noise_f[0]], 1),
        np.concatenate([fs[m][1] for m in range(m_count)] + [noise_f[1]], 0),
    )
    return fs, joint


@pytest.mark.parametrize("m_count", [2, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nnls_lowrank_matches_dense(m_count, seed):
    rng = np.random.default_rng(100 * seed + m_count)
    fs, joint = planted_layer(rng, m_count)
    clients = np.stack([dense(f) for f in fs])
    lam_dense = nnls_dense(clients, dense(joint))
    result = nnls_lowrank(fs, joint)
    assert result.method == "cholesky" and not result.rank_deficient
    assert result.gram_rank == m_count
    scale = np.abs(lam_dense).max()
    np.testing.assert_allclose(result.lam, lam_dense, rtol=1e-8, atol=1e-8 * scale)
    assert np.all(result.lam >= 0)
    residual = dense_objective(lam_dense, clients, dense(joint))
    assert result.residual_sq == pytest.approx(residual, rel=1e-8)
    assert result.relative_residual == pytest.approx(residual / np.sum(dense(joint) ** 2), 1e-8)
    assert np.any(result.lam == 0.0)  # the negative directions are clipped: constraints active


def test_nnls_lowrank_rank_deficient_cases():
    rng = np.random.default_rng(7)
    d, k = 24, 30
    base = [factors(rng, d, k, 3) for _ in range(4)]
    zero = (np.zeros((d, 3)), rng.standard_normal((3, k)))
    noise = factors(rng, d, k, 2)

    def joint_of(fs, lam):
        return (
            np.concatenate(
                [lam_m * f[0] for lam_m, f in zip(lam, fs, strict=True)] + [noise[0]], 1
            ),
            np.concatenate([f[1] for f in fs] + [noise[1]], 0),
        )

    dup = (base[1][0].copy(), base[1][1].copy())
    scaled = (2.0 * base[2][0], base[2][1])  # a positive multiple: singular, not a duplicate
    tiny_d, tiny_k = 2, 2  # 8 rank-1 clients in a 4-dimensional space
    tiny = [factors(rng, tiny_d, tiny_k, 1) for _ in range(8)]
    tiny_joint = factors(rng, tiny_d, tiny_k, 2)
    cases = {
        "zero client": ([base[0], zero, base[1]], [0.5, 0.3, 0.4]),
        "duplicated clients": ([base[0], base[1], dup, base[2]], [0.2, 0.3, 0.3, 0.5]),
        "positive multiple": ([base[0], base[2], scaled, base[3]], [0.2, 0.3, 0.2, -0.1]),
        "M > rank": (tiny, None),
    }
    for label, (fs, lam) in cases.items():
        joint = tiny_joint if lam is None else joint_of(fs, lam)
        clients = np.stack([dense(f) for f in fs])
        lam_dense = nnls_dense(clients, dense(joint))
        result = nnls_lowrank(fs, joint)
        assert result.rank_deficient, label
        assert result.gram_rank < len(fs), label
        assert np.all(result.lam >= 0), label
        best = dense_objective(lam_dense, clients, dense(joint))
        ours = dense_objective(result.lam, clients, dense(joint))
        assert ours == pytest.approx(best, rel=1e-8), label
        assert result.residual_sq == pytest.approx(best, rel=1e-8), label
        again = nnls_lowrank(fs, joint)
        assert np.array_equal(again.lam, result.lam), f"{label}: not deterministic"
    zero_case = nnls_lowrank(*[cases["zero client"][0], joint_of(*cases["zero client"])])
    assert zero_case.lam[1] == 0.0 and zero_case.excluded == (1,)
    dup_case = nnls_lowrank(cases["duplicated clients"][0], joint_of(*cases["duplicated clients"]))
    assert dup_case.lam[2] == 0.0 and dup_case.excluded == (2,)
    assert dup_case.lam[1] == pytest.approx(0.6, abs=0.05)  # carries both duplicates' weight
    assert nnls_lowrank(tiny, tiny_joint).method == "eigen"
    # all-zero clients and a zero joint delta
    all_zero = nnls_lowrank([zero, zero], (np.zeros((d, 1)), np.zeros((1, k))))
    assert np.array_equal(all_zero.lam, [0.0, 0.0]) and all_zero.relative_residual == 0.0


def test_nnls_repeat_rows(rng):
    deltas = random_repeat(rng, "r0", clients=["a", "b", "c"], layers=["l0", "l1"])
    frame = nnls_repeat(deltas)
    assert list(frame.columns[:5]) == ["repeat_id", "client", "layer", "lam", "relative_residual"]
    assert len(frame) == 6 and set(frame["client"]) == {"a", "b", "c"}
    first = nnls_lowrank(deltas.client_factors["l1"], deltas.joint_factors["l1"]).lam
    np.testing.assert_array_equal(frame.loc[frame["layer"] == "l1", "lam"], first)
