"""``--fraction-train C``: K = max(1, floor(C M)) with C the decimal as written, exact (0.29 of 100
clients is 29, not the 28 of the float product 28.999...), against ``fractions.Fraction``."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from livar_merge.federated.config import resolve_config
from livar_merge.federated.sampling import clients_per_round


def reference_k(text: str, m: int) -> int | None:
    """K of the decimal ``text`` among ``m`` clients, in exact rational arithmetic (None: all)."""
    k = max(1, math.floor(Fraction(text) * m))
    return None if k == m else k


@pytest.mark.parametrize(
    ("text", "m", "k"),
    [
        ("0.29", 100, 29),
        ("0.57", 100, 57),
        ("0.58", 100, 58),
        ("0.7", 10, 7),
        ("0.1", 3, 1),
        ("0.3", 10, 3),
        ("0.35", 20, 7),
        ("0.999", 1000, 999),
        ("0.5", 3, 1),
        ("1", 7, None),
        ("0.99", 10, 9),
    ],
)
def test_fraction_rule_is_exact(text, m, k):
    assert reference_k(text, m) == k
    assert clients_per_round(m, fraction=float(text)) == k


def test_fraction_rule_agrees_with_fractions_over_a_grid():
    texts = [f"0.{d:02d}" for d in range(1, 100)] + [f"0.{d:03d}" for d in range(1, 1000, 7)]
    for text in texts:
        for m in range(1, 201):
            assert clients_per_round(m, fraction=float(text)) == reference_k(text, m), (text, m)


def test_the_config_gives_the_exact_k():
    config = resolve_config("tiny", None, {"num_clients": 100, "fraction_train": 0.29})
    assert config.participants_per_round() == 29
