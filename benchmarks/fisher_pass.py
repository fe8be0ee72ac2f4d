"""The clients' diagonal Fisher pass: one batched backward pass with per-sample gradients from
layer inputs and back-propagated signals (shipped) against one backward pass per sample (the
earlier implementation, kept as the fallback for trainable non-Linear modules), side by side on
the same model, samples and machine, alternating so both see the same load.

    python benchmarks/fisher_pass.py                      # the cpu preset's backbone and data
    python benchmarks/fisher_pass.py --samples 64 --repeats 3

Prints and saves (``benchmarks/results/fisher_pass.{json,md}``) the median seconds of each, their
ratio, and the largest relative difference of the two results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from livar_merge.federated import statistics as stats
    from livar_merge.federated.config import resolve_config
    from livar_merge.federated.federation import build_federation

    config = resolve_config(args.preset, None, {"method": "fisher"})
    fed = build_federation(config, dataset=config.dataset, seed=config.seed, beta=config.beta)
    model = fed.model.eval()
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # a trained-looking adapter (B != 0)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    source, chosen = fed.train_source, np.asarray(fed.parts[0])[: args.samples]
    linears = stats._trainable_linears(model)

    def batched() -> dict[int, torch.Tensor]:
        return stats._fisher_by_hooks(model, linears, source, chosen, 32)[0]

    def per_sample() -> dict[int, torch.Tensor]:
        return stats._fisher_per_sample(model, source, chosen, 32)[0]

    times: dict[str, list[float]] = {"batched": [], "per_sample": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("per_sample", per_sample)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    worst = max(
        float(((results["batched"][k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item())
        for k, v in results["per_sample"].items()
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["per_sample"] / medians["batched"]
    setup = (
        f"{config.model} ({config.weights}), {config.image_size} px, {len(chosen)} samples of "
        f"client 0, batch 32, {len(linears)} trainable Linear modules"
    )
    result = {
        "setup": setup,
        "machine": machine(),
        "seconds": times,
        "median_seconds": medians,
        "speed_up": ratio,
        "max_relative_difference": worst,
    }
    markdown = (
        f"Diagonal Fisher pass, {setup}; median of {args.repeats} alternating repeats:\n\n"
        f"| implementation | seconds | samples/s |\n|---|---|---|\n"
        f"| one batched backward (shipped) | {medians['batched']:.2f} | "
        f"{len(chosen) / medians['batched']:.1f} |\n"
        f"| one backward per sample | {medians['per_sample']:.2f} | "
        f"{len(chosen) / medians['per_sample']:.1f} |\n\n"
        f"speed-up {ratio:.1f}x; largest relative difference of the results {worst:.1e}"
    )
    save("fisher_pass", result, markdown)


if __name__ == "__main__":
    main()
