"""RegMean (regmean_delta, regmean_head, shrink_gram) against independent computations."""

import numpy as np
import pytest
import torch

from livar_merge.aggregation import make_aggregator
from livar_merge.aggregation.regmean import regmean_delta, regmean_head, shrink_gram
from livar_merge.errors import MethodOptionError


def test_regmean_delta_solves_the_regression_on_the_clients_data(rng):
    """Shrinkage 1: RegMean = argmin_W sum_m ||X_m W^T - X_m dW_m^T||^2 (lstsq on stacked data)."""
    d, k, r, m = 7, 5, 2, 3
    xs = [rng.normal(size=(40, k)) for _ in range(m)]
    bs = [torch.as_tensor(rng.normal(size=(d, r))) for _ in range(m)]
    as_ = [torch.as_tensor(rng.normal(size=(r, k))) for _ in range(m)]
    grams = [torch.as_tensor(x.T @ x) for x in xs]
    merged = regmean_delta(bs, as_, grams, scaling=0.5, shrinkage=1.0).numpy()
    targets = [x @ (0.5 * b.numpy() @ a.numpy()).T for x, b, a in zip(xs, bs, as_, strict=True)]
    expected, *_ = np.linalg.lstsq(np.vstack(xs), np.vstack(targets), rcond=None)
    np.testing.assert_allclose(merged, expected.T, rtol=1e-9, atol=1e-10)


def test_regmean_with_shrinkage_matches_numpy_on_the_same_grams(rng):
    d, k, r = 6, 4, 2
    grams = [torch.as_tensor(g.T @ g) for g in (rng.normal(size=(9, k)) for _ in range(3))]
    bs = [torch.as_tensor(rng.normal(size=(d, r))) for _ in range(3)]
    as_ = [torch.as_tensor(rng.normal(size=(r, k))) for _ in range(3)]
    merged = regmean_delta(bs, as_, grams, scaling=1.0, shrinkage=0.3).numpy()
    shrunk = [0.3 * g.numpy() + 0.7 * np.diag(np.diag(g.numpy())) for g in grams]
    num = sum((b.numpy() @ a.numpy()) @ g for b, a, g in zip(bs, as_, shrunk, strict=True))
    expected = np.linalg.lstsq(sum(shrunk).T, num.T, rcond=None)[0].T
    np.testing.assert_allclose(merged, expected, rtol=1e-9)
    torch.testing.assert_close(shrink_gram(grams[0], 0.3), torch.as_tensor(shrunk[0]))


def test_regmean_singular_gram_uses_the_pseudo_inverse(rng):
    x = rng.normal(size=(3, 5))  # rank 3 < 5
    gram = torch.as_tensor(x.T @ x)
    b, a = torch.as_tensor(rng.normal(size=(4, 2))), torch.as_tensor(rng.normal(size=(2, 5)))
    merged = regmean_delta([b], [a], [gram], scaling=1.0, shrinkage=1.0).numpy()
    expected = (b.numpy() @ a.numpy() @ gram.numpy()) @ np.linalg.pinv(gram.numpy())
    np.testing.assert_allclose(merged, expected, atol=1e-8)


def test_regmean_head_with_bias(rng):
    feats = [rng.normal(size=(30, 4)) for _ in range(2)]
    ws = [torch.as_tensor(rng.normal(size=(3, 4))) for _ in range(2)]
    bs = [torch.as_tensor(rng.normal(size=3)) for _ in range(2)]
    grams = [torch.as_tensor(np.c_[f, np.ones(30)].T @ np.c_[f, np.ones(30)]) for f in feats]
    w, b = regmean_head(ws, bs, grams, shrinkage=1.0)
    xs = [np.c_[f, np.ones(30)] for f in feats]
    ys = [f @ w_.numpy().T + b_.numpy() for f, w_, b_ in zip(feats, ws, bs, strict=True)]
    sol = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    np.testing.assert_allclose(w.numpy(), sol[:, :-1], atol=1e-9)
    np.testing.assert_allclose(b.numpy(), sol[:, -1], atol=1e-9)


def test_regmean_refuses_factors_mode():
    with pytest.raises(MethodOptionError, match="regmean merges dense deltas.*product' or 'svd"):
        make_aggregator("regmean", lora_merge="factors")
