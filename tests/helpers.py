"""Independent reference computations used by the tests (plain loops, no livar code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def percentile_linear(values: list[float], p: float) -> float:
    """Linear-interpolation percentile written out (the 'linear' method of Hyndman-Fan type 7)."""
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def paper_bin(value: float, low: float, high: float) -> int:
    """Table A's three bins: Q < low, low <= Q <= high, Q > high."""
    if value < low:
        return 0
    if value > high:
        return 2
    return 1


def brute_force_alpha(
    omega_a: np.ndarray, omega_b: np.ndarray, grid: np.ndarray, edges_a=(25, 50), edges_b=(60, 80)
) -> np.ndarray:
    """Eq. 5 with loops for a 3x3 table: grid[b_bin][a_bin]."""
    m_count, l_count = omega_a.shape
    pa = [percentile_linear(list(omega_a.ravel()), p) for p in edges_a]
    pb = [percentile_linear(list(omega_b.ravel()), p) for p in edges_b]
    raw = np.zeros((m_count, l_count))
    for m in range(m_count):
        for l in range(l_count):
            raw[m, l] = grid[paper_bin(omega_b[m, l], *pb)][paper_bin(omega_a[m, l], *pa)]
    alpha = np.zeros_like(raw)
    for l in range(l_count):
        total = sum(raw[m, l] for m in range(m_count))
        for m in range(m_count):
            alpha[m, l] = raw[m, l] / total
    return alpha


LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def tiny_peft_vit(rank: int = 4, alpha: float = 8.0, num_classes: int = 5, seed: int = 0):
    """A 2-block, width-32 timm ViT on 16x16 inputs with peft LoRA on the block Linears."""
    import peft
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
    )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, modules_to_save=["head"]
    )
    return peft.get_peft_model(model, config)


def write_run(
    root: Path,
    dataset: str,
    method: str,
    beta: float,
    seed: int,
    accuracies: list[float],
    *,
    finished: bool = True,
    alpha=None,
    timings: dict[str, list[float]] | None = None,
) -> Path:
    """A livar-fed run folder: config.json, metrics.csv (plus any timing columns given, one
    value per round), summary.json when finished, alpha.csv when given."""
    import pandas as pd

    folder = root / f"{dataset}-{method}-b{beta:g}-s{seed}"
    folder.mkdir(parents=True)
    config = {"dataset": dataset, "method": method, "beta": beta, "seed": seed}
    (folder / "config.json").write_text(json.dumps({"config": config, "config_hash": "x"}))
    rounds = list(range(1, len(accuracies) + 1))
    metrics = pd.DataFrame({"round": rounds, "test_accuracy": accuracies, "test_loss": 1.0})
    for column, values in (timings or {}).items():
        metrics[column] = values
    metrics.to_csv(folder / "metrics.csv", index=False)
    if alpha is not None:
        alpha.to_csv(folder / "alpha.csv", index=False)
    if finished:
        summary = {
            "final_accuracy": accuracies[-1],
            "best_accuracy": max(accuracies),
            "accuracy_per_round": accuracies,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder
