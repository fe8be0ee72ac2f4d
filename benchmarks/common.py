"""Shared helpers of the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# ViT-B/16 LoRA layer shapes (out d, in k) of one block; 12 blocks.
VIT_B16_BLOCK = {
    "attn.qkv": (2304, 768),
    "attn.proj": (768, 768),
    "mlp.fc1": (3072, 768),
    "mlp.fc2": (768, 3072),
}


def vit_b16_layers(blocks: int = 12) -> dict[str, tuple[int, int]]:
    return {
        f"blocks.{i}.{name}": shape for i in range(blocks) for name, shape in VIT_B16_BLOCK.items()
    }


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from livar_merge.federated.machine import machine_record

    info.update(machine_record())  # cpu name and fp32 GFLOP/s: the throughput beside wall times
    return info


def median_time(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5, device: str = "cpu") -> float:
    """Measured copy bandwidth in bytes/s (read + write counted once each: 2 * nbytes)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    seconds, _ = median_time(lambda: dst.copy_(src), repeats=repeats, sync=sync)
    return 2 * nbytes / seconds


def save(name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def statistics_steps_seconds(
    model: Any,
    params: list[Any],
    x: Any,
    y: Any,
    *,
    variant: str,
    steps: int,
    num_classes: int,
    precision: str,
    device: Any,
) -> float:
    """Wall seconds of ``steps`` AdamW training steps on the batch ``(x, y)``: ``bare``; with
    ``ImportanceTracker`` attached to the optimizer (``omega``); or also
    ``ClassFeatureStats.update`` on every step (``omega+sigma``), each statistic's one host copy
    of a round included. Synchronised at both ends."""
    import torch

    from livar_merge.federated.model import autocast_context, forward_with_features
    from livar_merge.signals import ClassFeatureStats, ImportanceTracker

    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    tracker = ImportanceTracker(model).attach(optimizer) if variant != "bare" else None
    stats = ClassFeatureStats(num_classes) if variant == "omega+sigma" else None
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast_context(precision, device):
            features, logits = forward_with_features(model, x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stats is not None:
            stats.update(features.detach().float(), y, logits.detach().float())
    if tracker is not None:
        tracker.result()
        tracker.detach()
    if stats is not None:
        stats.result()
    sync(device)
    return time.perf_counter() - start


def training_parser(doc: str | None, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")):
    """The arguments every training benchmark takes: ``--preset`` (its model and threads, with
    random weights), ``--device`` and ``--precision``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=list(precisions))
    return parser


def preset_on_device(args: argparse.Namespace) -> tuple[Any, Any]:
    """The preset's config (random weights) and the torch device, with the preset's CPU threads."""
    import torch

    from livar_merge.federated.config import resolve_config

    config = resolve_config(args.preset, None, {"weights": "random"})
    if config.threads and args.device == "cpu":
        torch.set_num_threads(config.threads)
    return config, torch.device(args.device)
