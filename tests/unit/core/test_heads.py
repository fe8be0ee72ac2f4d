import numpy as np
import pytest
import torch

from livar_merge import (
    ClientUpdateError,
    fedavg_head,
    merge_heads,
    sample_class_weights,
    variance_class_weights,
)


def random_heads(m, c, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(c, d, generator=gen, dtype=torch.float64) for _ in range(m)],
        [torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(m)],
    )


def eq6_by_hand(weights, biases, sigma, present):
    """Eq. 6 written out: H^(c) = sum_m sigma_m^(c) / Sigma^(c) H_m^(c), loops only."""
    m_count, c_count = sigma.shape
    w_out = torch.zeros_like(weights[0])
    b_out = torch.zeros_like(biases[0])
    for c in range(c_count):
        total = sum(sigma[m, c] for m in range(m_count) if present[m, c])
        for m in range(m_count):
            if present[m, c]:
                w_out[c] += sigma[m, c] / total * weights[m][c]
                b_out[c] += sigma[m, c] / total * biases[m][c]
    return w_out, b_out


@pytest.mark.parametrize("seed", range(4))
def test_variance_weighting_equals_eq6(seed):
    rng = np.random.default_rng(seed)
    m, c, d = 5, 7, 6
    weights, biases = random_heads(m, c, d, seed)
    sigma = rng.gamma(2.0, size=(m, c))
    present = rng.random((m, c)) < 0.7
    present[0] = True  # every class covered by at least one client
    sigma_sent = np.where(present, sigma, np.nan)  # absent classes may be NaN
    merged = merge_heads(weights, biases, variance_class_weights(sigma_sent, present))
    w_ref, b_ref = eq6_by_hand(weights, biases, sigma, present)
    torch.testing.assert_close(merged.weight, w_ref)
    torch.testing.assert_close(merged.bias, b_ref)
    assert merged.uncovered == ()
    np.testing.assert_allclose(merged.class_weights.sum(0), 1.0)


def test_uncovered_class_keeps_previous_row():
    weights, biases = random_heads(3, 4, 2)
    present = np.ones((3, 4), bool)
    present[:, 2] = False
    prev_w, prev_b = (
        torch.full((4, 2), 9.0, dtype=torch.float64),
        torch.full((4,), -9.0, dtype=torch.float64),
    )
    cw = variance_class_weights(np.ones((3, 4)), present)
    merged = merge_heads(weights, biases, cw, previous_weight=prev_w, previous_bias=prev_b)
    assert merged.uncovered == (2,)
    torch.testing.assert_close(merged.weight[2], prev_w[2])
    assert merged.bias[2] == -9.0
    torch.testing.assert_close(merged.weight[0], sum(w[0] for w in weights) / 3)
    with pytest.raises(ClientUpdateError, match=r"classes \[2\] have no statistics"):
        merge_heads(weights, biases, cw)


def test_sample_weighting_is_fedavg():
    weights, biases = random_heads(3, 4, 2, seed=3)
    n = np.array([10, 30, 60])
    merged = fedavg_head(weights, biases, n)
    torch.testing.assert_close(
        merged.weight, 0.1 * weights[0] + 0.3 * weights[1] + 0.6 * weights[2]
    )
    torch.testing.assert_close(merged.bias, 0.1 * biases[0] + 0.3 * biases[1] + 0.6 * biases[2])
    np.testing.assert_allclose(sample_class_weights(n, 4)[:, 3], [0.1, 0.3, 0.6])


def test_zero_variance_class_weights_present_clients_equally():
    present = np.array([[True, True], [True, False], [False, True]])
    sigma = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0]])
    with pytest.warns(RuntimeWarning, match="zero total feature variance"):
        cw = variance_class_weights(sigma, present)
    np.testing.assert_allclose(cw[:, 0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(cw[:, 1], [0.25, 0.0, 0.75])


def test_bad_inputs_name_client_and_class():
    present = np.ones((2, 3), bool)
    sigma = np.ones((2, 3))
    sigma[1, 2] = np.inf
    with pytest.raises(ClientUpdateError, match=r"client 1 \('b'\), class 2 is inf"):
        variance_class_weights(sigma, present, client_ids=["a", "b"])
    weights, biases = random_heads(2, 3, 4)
    weights[1] = weights[1][:, :3]
    with pytest.raises(ClientUpdateError, match="client 1: head weight"):
        merge_heads(weights, biases, np.ones((2, 3)))
    weights, biases = random_heads(2, 3, 4)
    biases[0][1] = float("nan")
    with pytest.raises(ClientUpdateError, match="client 0: head bias holds 1 NaN"):
        merge_heads(weights, biases, np.ones((2, 3)))
    with pytest.raises(ClientUpdateError, match="class weights have shape"):
        merge_heads(*random_heads(2, 3, 4), np.ones((2, 4)))
