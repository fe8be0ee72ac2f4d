import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livar_merge import ClientUpdateError, GShapTable, livar_coefficients, make_table
from livar_merge.coefficients import livar_coefficient_details
from tests.helpers import brute_force_alpha

PAPER = GShapTable.load("paper-table-a")
RELEASED = GShapTable.load("reference-code")


def test_hand_worked_example_with_values_on_the_quantiles():
    # 21 pooled values 0..20: the 25th/50th/60th/80th percentiles are exactly 5, 10, 12, 16.
    omega_a = np.arange(21.0).reshape(3, 7)
    omega_b = np.arange(21.0)[::-1].reshape(3, 7)
    details = livar_coefficient_details(omega_a, omega_b, PAPER)
    assert details.cuts_a.tolist() == [5.0, 10.0] and details.cuts_b.tolist() == [12.0, 16.0]
    # client 0, layer 5: omega_A = 5 (on Q25 -> middle), omega_B = 15 (60..80 -> middle)
    assert (details.bin_a[0, 5], details.bin_b[0, 5]) == (1, 1)
    # client 0, layer 4: omega_A = 4 (< Q25), omega_B = 16 (on Q80 -> middle)
    assert (details.bin_a[0, 4], details.bin_b[0, 4]) == (0, 1)
    # client 1, layer 3: omega_A = 10 (on Q50 -> middle), omega_B = 10 (< Q60)
    assert (details.bin_a[1, 3], details.bin_b[1, 3]) == (1, 0)
    # client 0, layer 0: omega_A = 0 (low), omega_B = 20 (> Q80) -> 0.193
    assert details.raw[0, 0] == pytest.approx(0.193)
    # client 2, layer 6: omega_A = 20 (> Q50), omega_B = 0 (< Q60) -> 0.038
    assert details.raw[2, 6] == pytest.approx(0.038)
    # layer 0 by hand: clients have (A, B) = (0, 20), (7, 13), (14, 6)
    #   -> 0.193 (low A, high B), 0.089 (mid A, mid B), 0.038 (low B)
    expected = np.array([0.193, 0.089, 0.038]) / (0.193 + 0.089 + 0.038)
    np.testing.assert_allclose(details.alpha[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("table", [PAPER, RELEASED], ids=["paper", "released"])
@pytest.mark.parametrize("shape", [(10, 48), (5, 12), (2, 3), (7, 1)])
def test_matches_brute_force_on_random_inputs(rng, table, shape):
    for _ in range(5):
        omega_a = rng.lognormal(size=shape)
        omega_b = rng.lognormal(size=shape)
        alpha = livar_coefficients(omega_a, omega_b, table)
        expected = brute_force_alpha(omega_a, omega_b, table.values)
        np.testing.assert_allclose(alpha, expected, rtol=1e-12)
        np.testing.assert_allclose(alpha.sum(axis=0), 1.0, rtol=1e-12)


def test_ties_one_client_one_layer():
    tied = np.full((4, 6), 3.0)
    np.testing.assert_allclose(livar_coefficients(tied, tied, PAPER), 0.25)
    assert livar_coefficient_details(tied, tied, PAPER).raw[0, 0] == pytest.approx(0.089)
    one_client = livar_coefficients(np.full((1, 5), 0.3), np.arange(5.0)[None], PAPER)
    np.testing.assert_array_equal(one_client, np.ones((1, 5)))
    one_layer = livar_coefficients([[1.0], [2.0], [3.0]], [[3.0], [2.0], [1.0]], PAPER)
    assert one_layer.shape == (3, 1) and one_layer.sum() == pytest.approx(1.0)
    zeros = np.zeros((3, 4))
    np.testing.assert_allclose(livar_coefficients(zeros, zeros, PAPER), 1 / 3)


def test_accepts_torch_and_table_names():
    a = torch.rand(3, 4, dtype=torch.float64)
    b = torch.rand(3, 4, dtype=torch.float64)
    np.testing.assert_array_equal(
        livar_coefficients(a, b, "paper-table-a"), livar_coefficients(a.numpy(), b.numpy(), PAPER)
    )


def test_four_by_four_table(rng):
    grid = rng.uniform(0.01, 1.0, size=(4, 4))
    table = make_table("grid4", 1, grid, edges_a=(25, 50, 75), edges_b=(25, 50, 75))
    omega_a, omega_b = rng.random((6, 9)), rng.random((6, 9))
    details = livar_coefficient_details(omega_a, omega_b, table)
    qa = np.percentile(omega_a, [25, 50, 75])
    qb = np.percentile(omega_b, [25, 50, 75])
    for m in range(6):
        for l in range(9):
            a_bin = sum(omega_a[m, l] > q for q in qa[1:]) + (omega_a[m, l] >= qa[0])
            b_bin = sum(omega_b[m, l] > q for q in qb[1:]) + (omega_b[m, l] >= qb[0])
            assert details.raw[m, l] == grid[b_bin, a_bin]
    np.testing.assert_allclose(details.alpha.sum(0), 1.0)


@pytest.mark.parametrize(
    ("value", "kind"), [(np.nan, "not finite"), (np.inf, "not finite"), (-1.0, "negative")]
)
def test_bad_omegas_name_client_and_layer(value, kind):
    omega = np.ones((3, 4))
    omega[2, 1] = value
    names = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2"]
    with pytest.raises(
        ClientUpdateError, match=rf"omega_B of client 2 \('c'\), layer blocks.0.proj is {kind}"
    ):
        livar_coefficients(
            np.ones((3, 4)), omega, PAPER, client_ids=["a", "b", "c"], layer_names=names
        )


def test_shape_errors():
    with pytest.raises(ClientUpdateError, match="omega_A has shape"):
        livar_coefficients(np.ones((3, 4)), np.ones((3, 5)), PAPER)
    with pytest.raises(ClientUpdateError, match="2-D"):
        livar_coefficients(np.ones(3), np.ones(3), PAPER)
    with pytest.raises(ClientUpdateError, match="empty"):
        livar_coefficients(np.ones((0, 4)), np.ones((0, 4)), PAPER)


@settings(max_examples=50, deadline=None)
@given(
    m=st.integers(1, 12),
    l=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    discrete=st.booleans(),
)
def test_columns_sum_to_one_and_alpha_positive(m, l, seed, discrete):
    rng = np.random.default_rng(seed)
    draw = (
        (lambda: rng.integers(0, 3, (m, l)).astype(float))
        if discrete
        else (lambda: rng.exponential(size=(m, l)))
    )
    omega_a, omega_b = draw(), draw()
    alpha = livar_coefficients(omega_a, omega_b, PAPER)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(alpha, brute_force_alpha(omega_a, omega_b, PAPER.values), rtol=1e-12)
