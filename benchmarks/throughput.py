"""Training throughput of the runtime's client loop against a bare timm + peft loop.

Same model (the ``cpu`` preset's ViT or ``--preset paper``'s ViT-B/16), same images, same batch
size, one local epoch each, interleaved repeats. Variants:

* ``bare``             for x, y in batches: loss(model(x), y).backward(); AdamW step
* ``runtime``          ``train_client`` with no LIVAR statistics (method ``fedavg``)
* ``runtime+livar``    ``train_client`` with omega and sigma (the final sigma pass included)

    python benchmarks/throughput.py
    python benchmarks/throughput.py --preset paper --device cuda --precision bf16 --samples 4096
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, preset_on_device, save, training_parser


def main() -> None:
    from livar_merge.federated.client import train_client
    from livar_merge.federated.config import TrainSettings
    from livar_merge.federated.data import BatchSource
    from livar_merge.federated.datasets import InMemoryImages
    from livar_merge.federated.federation import build_seeded_model
    from livar_merge.federated.model import autocast_context, restore_parameters, snapshot_trainable

    parser = training_parser(__doc__)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config, device = preset_on_device(args)
    classes = 10
    model, info = build_seeded_model(config, classes, seed=0)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    size = config.image_size
    images = torch.randint(0, 256, (args.samples, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, classes, (args.samples,), generator=gen).numpy()
    dataset = InMemoryImages(images, labels, [str(c) for c in range(classes)])
    source = BatchSource(dataset, mean=info.mean, std=info.std, device=device)
    indices = np.arange(args.samples)
    start_state = snapshot_trainable(model)
    settings = TrainSettings(
        local_epochs=1,
        batch_size=config.batch_size,
        lr=1e-4,
        weight_decay=0.1,
        precision=args.precision,
    )
    batches = list(source.batches(indices, config.batch_size, shuffle=True, seed=1))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        for x, y in batches:
            with autocast_context(args.precision, device):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def runtime(needs: frozenset[str]):
        return lambda: train_client(
            model,
            source,
            indices,
            client_id="c",
            num_classes=classes,
            settings=settings,
            seed=0,
            round_index=1,
            needs=needs,
        )

    variants = {
        "bare": bare,
        "runtime": runtime(frozenset()),
        "runtime+livar": runtime(frozenset({"omega", "sigma"})),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        restore_parameters(model, start_state)
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            restore_parameters(model, start_state)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    throughput = {k: args.samples / v for k, v in median.items()}
    lines = [
        f"| variant ({info.name}, {size} px, batch {config.batch_size}, {args.precision}, "
        f"{device}) | images/s | x bare |",
        "|---|---|---|",
    ]
    for name in variants:
        lines.append(
            f"| {name} | {throughput[name]:.0f} | {throughput[name] / throughput['bare']:.3f} |"
        )
    save(
        f"throughput_{device.type}_{args.preset}",
        {
            "benchmark": "throughput",
            "machine": machine(),
            "preset": args.preset,
            "precision": args.precision,
            "samples": args.samples,
            "median_seconds": median,
            "images_per_second": throughput,
            "all_seconds": times,
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
