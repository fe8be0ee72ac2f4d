"""Independent reference computations used by the tests (plain loops, no livar code)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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


def fresh_imports(code: str, modules) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(*[m for m in {tuple(modules)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(num_classes: int = 5):
    """A plain (no peft) 2-block, width-32 timm ViT on 16x16 inputs."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT
    )


def tiny_peft_vit(rank: int = 4, alpha: float = 8.0, num_classes: int = 5, seed: int = 0):
    """``tiny_vit`` (seeded) with peft LoRA on the block Linears."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = tiny_vit(num_classes)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, modules_to_save=["head"]
    )
    return peft.get_peft_model(model, config)


def fake_update(
    model,
    client_id: str,
    seed: int,
    *,
    num_classes: int = 5,
    max_count: int = 30,
    absent_class: bool = False,
    extra_samples: int = 0,
    extras: dict | None = None,
):
    """A plausible client update of ``model``: perturbed LoRA/head and positive omegas; with
    ``absent_class`` the class ``seed % num_classes`` has no samples (count 0, sigma NaN)."""
    import torch

    from livar_merge.aggregation import ClientUpdate
    from livar_merge.federated.model import head_module
    from livar_merge.federated.peft_keys import lora_state
    from livar_merge.signals import find_lora_parameters

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = head_module(model)
    layers = tuple(find_lora_parameters(model))
    present = np.ones(num_classes, bool)
    if absent_class:
        present[seed % num_classes] = False
    counts = np.where(present, rng.integers(2, max_count, num_classes), 0)
    return ClientUpdate(
        client_id=client_id,
        num_samples=int(counts.sum()) + extra_samples,
        lora={
            k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_state(model).items()
        },
        head_weight=head.weight.detach() + 0.05 * torch.randn(head.weight.shape, generator=g),
        head_bias=head.bias.detach() + 0.05 * torch.randn(head.bias.shape, generator=g),
        layer_names=layers,
        omega_a=rng.uniform(0.1, 2.0, len(layers)),
        omega_b=rng.uniform(0.1, 2.0, len(layers)),
        class_sigma=np.where(present, rng.uniform(0.1, 1.0, num_classes), np.nan),
        class_present=present,
        class_counts=counts,
        extras=dict(extras or {}),
    )


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
