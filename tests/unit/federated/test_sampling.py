"""Client sampling (livar_merge.federated.sampling): the draw against an independent
re-implementation, its invariances, its uniformity, K from a count or a fraction, and the
config checks."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from scipy import stats

from livar_merge.errors import ConfigError
from livar_merge.federated.config import resolve_config
from livar_merge.federated.sampling import (
    clients_per_round,
    participation_counts,
    sample_participants,
)

IDS = [f"client_{m}" for m in range(12)]


def independent_draw(ids: list[str], k: int, seed: int, round_index: int) -> list[str]:
    """The documented rule written out: ids in natural order, a numpy generator seeded with
    the first 8 bytes (little-endian, >> 1) of sha256("seed/round/participants"), k indices
    without replacement, in increasing order."""
    ordered = sorted(ids, key=lambda c: int(c.split("_")[1]))
    digest = hashlib.sha256(f"{seed}/{round_index}/participants".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little") >> 1)
    picked = sorted(int(i) for i in rng.choice(len(ordered), size=k, replace=False))
    return [ordered[i] for i in picked]


@pytest.mark.parametrize("seed", [0, 42, 1234])
@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_the_draw_equals_an_independent_draw(seed, k):
    for r in range(1, 9):
        assert sample_participants(IDS, k, seed=seed, round_index=r) == independent_draw(
            IDS, k, seed, r
        )


def test_the_draw_ignores_the_order_and_repeats_of_the_available_ids():
    shuffled = IDS[:]
    random.Random(3).shuffle(shuffled)
    for r in range(1, 6):
        expected = sample_participants(IDS, 4, seed=7, round_index=r)
        assert sample_participants(shuffled + shuffled[:3], 4, seed=7, round_index=r) == expected
        assert len(set(expected)) == 4 and set(expected) <= set(IDS)
        # natural order: client_2 before client_10
        assert expected == sorted(expected, key=lambda c: int(c.split("_")[1]))


def test_all_clients_when_k_is_none_or_not_smaller_than_the_available():
    assert sample_participants(IDS, None, seed=1, round_index=1) == IDS
    assert sample_participants(IDS[:3], 5, seed=1, round_index=1) == IDS[:3]


def test_rounds_and_seeds_draw_different_sets():
    draws = {
        tuple(sample_participants(IDS, 4, seed=s, round_index=r))
        for s in range(3)
        for r in range(1, 11)
    }
    assert len(draws) > 20  # C(12, 4) = 495 sets: 30 draws nearly all distinct


def test_participation_is_uniform_over_many_rounds():
    """Each client trains in K/M of the rounds: a chi-square test of the counts over 3,000
    rounds (expected 1,000 each), and every pair of clients co-occurs at the uniform rate."""
    k, rounds = 4, 3000
    counts = participation_counts(IDS, k, seed=5, rounds=rounds)
    observed = np.array([counts[c] for c in IDS])
    assert observed.sum() == k * rounds
    assert stats.chisquare(observed).pvalue > 1e-3
    pairs = np.zeros((12, 12))
    for r in range(1, rounds + 1):
        idx = [IDS.index(c) for c in sample_participants(IDS, k, seed=5, round_index=r)]
        for i in idx:
            for j in idx:
                pairs[i, j] += i != j
    expected_pair = rounds * k * (k - 1) / (12 * 11)  # 272.7
    off = pairs[~np.eye(12, dtype=bool)]
    assert np.abs(off - expected_pair).max() < 5 * np.sqrt(expected_pair)


@pytest.mark.parametrize(
    ("m", "count", "fraction", "k"),
    [
        (10, None, None, None),
        (10, 5, None, 5),
        (10, 10, None, None),
        (10, None, 0.5, 5),
        (10, None, 0.33, 3),
        (10, None, 0.01, 1),
        (10, None, 1.0, None),
        (7, None, 0.5, 3),
    ],
)
def test_clients_per_round_from_a_count_or_a_fraction(m, count, fraction, k):
    assert clients_per_round(m, count, fraction) == k


def test_clients_per_round_refuses_bad_values():
    with pytest.raises(ConfigError, match="not both"):
        clients_per_round(10, 5, 0.5)
    with pytest.raises(ConfigError, match=r"\[1, num_clients=10\], got 11"):
        clients_per_round(10, 11)
    with pytest.raises(ConfigError, match=r"\(0, 1\], got 1.5"):
        clients_per_round(10, None, 1.5)


def test_config_options_validate_and_keep_the_old_hash():
    base = resolve_config("tiny")
    assert base.participants_per_round() is None
    sampled = resolve_config("tiny", None, {"num_clients": 10, "clients_per_round": 5})
    assert sampled.participants_per_round() == 5
    assert (
        resolve_config(
            "tiny", None, {"num_clients": 10, "fraction_train": 0.5}
        ).participants_per_round()
        == 5
    )
    assert sampled.config_hash() != resolve_config("tiny", None, {"num_clients": 10}).config_hash()
    # runs written before the options existed keep their hash (resume)
    assert (
        base.config_hash()
        == resolve_config("tiny", None, {"clients_per_round": None}).config_hash()
    )
    with pytest.raises(ConfigError, match="clients_per_round/fraction_train"):
        resolve_config("tiny", None, {"clients_per_round": 4})  # tiny has 3 clients
    with pytest.raises(ConfigError, match="not both"):
        resolve_config("tiny", None, {"clients_per_round": 2, "fraction_train": 0.5})
