"""CCVR: pooled class moments, virtual features and the re-trained head."""

import numpy as np
import pytest
import torch

from livar_merge.aggregation.ccvr import (
    ClassMoments,
    pool_moments,
    retrain_head,
    sample_virtual_features,
)


@pytest.mark.parametrize("diagonal", [False, True])
def test_pooled_moments_equal_the_moments_of_the_union(rng, diagonal):
    data = [rng.normal(size=(n, 3)) * [1, 2, 3] + c for n, c in ((5, 0), (9, 1), (2, -1))]
    means = [x.mean(0)[None] for x in data]
    covs = [(np.diag(np.cov(x.T)) if diagonal else np.cov(x.T))[None] for x in data]
    counts = [np.array([len(x)]) for x in data]
    pooled = pool_moments(means, covs, counts)
    union = np.vstack(data)
    np.testing.assert_allclose(pooled.mean[0], union.mean(0), atol=1e-12)
    expected = np.diag(np.cov(union.T)) if diagonal else np.cov(union.T)
    np.testing.assert_allclose(pooled.cov[0], expected, atol=1e-12)
    assert pooled.count[0] == 16


def test_virtual_features_match_the_moments_within_sampling_error(rng):
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    moments = ClassMoments(
        mean=np.array([[1.0, -2.0, 0.5], [0, 0, 0]]),
        cov=np.stack([cov, np.eye(3)]),
        count=np.array([50, 1]),
    )
    n = 20000
    feats, labels = sample_virtual_features(moments, n, seed=0)
    assert labels.unique().tolist() == [0]  # class 1 has fewer than 2 pooled samples
    x = feats.double().numpy()
    std_err = np.sqrt(np.diag(cov) / n)
    assert (np.abs(x.mean(0) - moments.mean[0]) < 5 * std_err).all()
    np.testing.assert_allclose(np.cov(x.T), cov, rtol=0.06, atol=0.06)


def test_retrain_head_fits_virtual_features(rng):
    moments = ClassMoments(
        mean=np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]]),
        cov=np.stack([np.eye(2) * 0.3] * 3),
        count=np.array([10, 10, 10]),
    )
    feats, labels = sample_virtual_features(moments, 200, seed=1)
    weight, bias = torch.zeros(3, 2), torch.zeros(3)
    new_w, new_b = retrain_head(weight, bias, feats, labels, epochs=5, seed=0)
    accuracy = ((feats @ new_w.T + new_b).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95
