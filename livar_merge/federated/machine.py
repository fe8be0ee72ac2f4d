"""How fast this machine is, measured, so that wall times can be compared across machines.

CPUs differ about four-fold between the machines this toolkit runs on (a 2 GHz Zen-1 class
EPYC trains the default ViT at about a quarter of the speed of a newer core), so a wall time
means little without the throughput beside it. Two probes, a few seconds each:

* :func:`gflops_probe`: fp32 matrix-multiply GFLOP/s with the current torch thread count;
* :func:`training_probe`: training images/s of a given model (forward, backward and an AdamW
  step on its trainable parameters, on random images of the run's size), on a copy of the
  model, so the caller's model and random state are untouched.

:func:`machine_record` bundles them with the CPU name and thread count (the ``machine`` entry of
``summary.json``).
"""

from __future__ import annotations

import copy
import os
import platform
import time
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gflops_probe(*, size: int = 512, seconds: float = 1.0, device: str = "cpu") -> float:
    """fp32 GFLOP/s of ``size x size`` matrix products (``2 size^3`` flops each), timed for
    about ``seconds`` after one warm-up product."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * size**3 * count / elapsed / 1e9


def training_probe(
    model: torch.nn.Module,
    *,
    image_size: int,
    num_classes: int,
    batch_size: int = 16,
    steps: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> float:
    """Training images/s of ``model`` (a copy of it): ``steps`` timed AdamW steps on random
    ``[batch_size, 3, image_size, image_size]`` images after ``warmup`` untimed ones."""
    probe = copy.deepcopy(model).to(device).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    state = torch.random.get_rng_state()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        optimizer.step()

    try:
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return batch_size * steps / (time.perf_counter() - start)
    finally:
        torch.random.set_rng_state(state)


def machine_record(
    model: torch.nn.Module | None = None,
    *,
    image_size: int | None = None,
    num_classes: int = 10,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """CPU name, cores, torch threads, fp32 GFLOP/s and (given a model) its training images/s
    at ``image_size``, batch 16."""
    record: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gflops_fp32": round(gflops_probe(device=str(device)), 2),
    }
    if model is not None and image_size is not None:
        record["train_images_per_second"] = round(
            training_probe(model, image_size=image_size, num_classes=num_classes, device=device), 2
        )
        record["probe"] = {"batch_size": 16, "image_size": image_size, "optimizer": "AdamW"}
    return record


def describe(record: dict[str, Any]) -> str:
    """One line: ``<cpu>, <n> threads: <g> GFLOP/s fp32, <i> training images/s``."""
    text = (
        f"{record['cpu']}, {record['torch_threads']} threads: {record['gflops_fp32']} GFLOP/s fp32"
    )
    if "train_images_per_second" in record:
        size = record["probe"]["image_size"]
        text += f", {record['train_images_per_second']} training images/s ({size} px, batch 16)"
    return text
