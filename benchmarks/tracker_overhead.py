"""Per-step overhead of LIVAR's client-side signals in the runtime's training step.

Variants, timed side by side in one process and interleaved (ABCABC...) so drifts in machine
load hit all of them alike:

* ``bare``      forward, cross-entropy, backward, AdamW step;
* ``omega``     the same with ``ImportanceTracker`` attached to the optimizer;
* ``omega+sigma`` also ``ClassFeatureStats.update`` on every step (``--sigma-pass last-epoch``).

The default ``--sigma-pass final`` instead costs one inference pass over the local data after
training; its cost relative to one training epoch is reported as ``final_pass_per_epoch``.

    python benchmarks/tracker_overhead.py                      # CPU preset model
    python benchmarks/tracker_overhead.py --preset paper --device cuda --precision bf16
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import preset_on_device, statistics_steps_seconds, sync, training_parser

from livar_merge.federated.model import autocast_context, build_model, forward_with_features
from livar_merge.signals import ClassFeatureStats


def main() -> None:
    parser = training_parser(__doc__, precisions=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="blocks per variant")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    config, device = preset_on_device(args)
    torch.manual_seed(0)
    model, info = build_model(
        config.model,
        args.num_classes,
        weights="random",
        image_size=config.image_size,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        overrides=config.architecture_overrides(),
    )
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=device)
    y = torch.randint(0, args.num_classes, (config.batch_size,), device=device)

    def block(variant: str) -> float:
        seconds = statistics_steps_seconds(
            model,
            params,
            x,
            y,
            variant=variant,
            steps=args.steps,
            num_classes=args.num_classes,
            precision=args.precision,
            device=device,
        )
        return seconds / args.steps

    @torch.no_grad()
    def inference_block() -> float:
        model.eval()
        stats = ClassFeatureStats(args.num_classes)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            with autocast_context(args.precision, device):
                features, logits = forward_with_features(model, x)
            stats.update(features.float(), y, logits.float())
        stats.result()
        sync(device)
        model.train()
        return (time.perf_counter() - start) / args.steps

    variants = ["bare", "omega", "omega+sigma"]
    for variant in variants:  # warm-up
        block(variant)
    times: dict[str, list[float]] = {v: [] for v in [*variants, "final-pass"]}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(block(variant))
        times["final-pass"].append(inference_block())
    median = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "benchmark": "tracker_overhead",
        "model": info.name,
        "preset": args.preset,
        "lora_layers": len(info.lora_layers),
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "precision": args.precision,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "median_step_seconds": median,
        "ratio_omega": median["omega"] / median["bare"],
        "ratio_omega_sigma": median["omega+sigma"] / median["bare"],
        "final_pass_per_epoch": median["final-pass"] / median["bare"],
        "all_step_seconds": times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tracker_overhead_{device.type}_{args.preset}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| variant ({info.name}, batch {config.batch_size}, {args.precision}, {device}) "
        "| median step (ms) | ratio to bare |",
        "|---|---|---|",
    ]
    for variant in variants:
        lines.append(
            f"| {variant} | {1e3 * median[variant]:.2f} | {median[variant] / median['bare']:.4f} |"
        )
    lines.append(
        f"| final sigma pass (inference step) | {1e3 * median['final-pass']:.2f} | "
        f"{result['final_pass_per_epoch']:.4f} |"
    )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
