"""Server aggregation per round at ViT-B/16 shapes (48 LoRA layers, r = 16), M clients.

Each variant runs in its own subprocess; peak memory is the resident-set growth during one
aggregation (sampled every ms; on GPU the allocator peak), outputs included; times are medians
over repeats. Ratios are against FedAvg on factors, measured in the same invocation. The dense
output is compared with the floor of writing the dense deltas at the copy bandwidth measured in
the same run.

    python benchmarks/aggregation.py                    # CPU, M in {10, 100}
    python benchmarks/aggregation.py --device cuda      # GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import copy_bandwidth, machine, median_time, save, vit_b16_layers

VARIANTS = {
    "fedavg-factors": "FedAvg on factors (sum w B, sum w A)",
    "fedavg-product-dense": "FedAvg, exact sum w B A, dense",
    "livar-factors": "LIVAR alpha + factors",
    "livar-product-lowrank": "LIVAR alpha + exact Eq. 3, stacked rank-Mr factors",
    "livar-product-dense": "LIVAR alpha + exact Eq. 3, dense d x k",
    "livar-svd": "LIVAR alpha + Eq. 3 re-factorised to rank r (QR + small SVD)",
}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak_extra = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            extra = self._process.memory_info().rss - self._base
            self.peak_extra = max(self.peak_extra, extra)
            self._stop.wait(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        extra = self._process.memory_info().rss - self._base
        self.peak_extra = max(self.peak_extra, extra)


def make_inputs(num_clients: int, rank: int, device: str):
    import numpy as np
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = vit_b16_layers()
    states = []
    for _ in range(num_clients):
        state = {}
        for layer, (d, k) in layers.items():
            state[f"{layer}.lora_A.weight"] = torch.randn(rank, k, generator=gen).to(device)
            state[f"{layer}.lora_B.weight"] = torch.randn(d, rank, generator=gen).to(device)
        states.append(state)
    rng = np.random.default_rng(0)
    omega_a = rng.lognormal(size=(num_clients, len(layers)))
    omega_b = rng.lognormal(size=(num_clients, len(layers)))
    samples = rng.integers(100, 1000, size=num_clients)
    return states, omega_a, omega_b, samples, layers


def run_variant(variant: str, num_clients: int, rank: int, device: str, repeats: int) -> dict:
    import torch

    from livar_merge import GShapTable, fedavg_weights, livar_coefficients, merge_lora

    states, omega_a, omega_b, samples, _layers = make_inputs(num_clients, rank, device)
    table = GShapTable.load("paper-table-a")
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    if sync:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()

    def weights():
        if variant.startswith("fedavg"):
            return fedavg_weights(samples)
        return livar_coefficients(omega_a, omega_b, table)

    mode, output = {
        "fedavg-factors": ("factors", "factors"),
        "fedavg-product-dense": ("product", "dense"),
        "livar-factors": ("factors", "factors"),
        "livar-product-lowrank": ("product", "factors"),
        "livar-product-dense": ("product", "dense"),
        "livar-svd": ("svd", "factors"),
    }[variant]

    def once():
        return merge_lora(states, weights(), mode=mode, output=output)

    seconds, times = median_time(once, repeats=repeats, sync=sync)
    with PeakRSS() as rss:
        out = once()
    written = sum(
        (d.dense if d.dense is not None else d.B).numel() * 4
        + (0 if d.dense is not None else d.A.numel() * 4)
        for d in out.values()
    )
    peak = torch.cuda.max_memory_allocated() - base_mem if sync else rss.peak_extra
    return {
        "variant": variant,
        "clients": num_clients,
        "seconds": seconds,
        "times": times,
        "peak_extra_bytes": int(peak),
        "output_bytes": int(written),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(
            json.dumps(
                run_variant(args.single, args.clients[0], args.rank, args.device, args.repeats)
            )
        )
        return
    bandwidth = copy_bandwidth(device=args.device)
    rows = []
    for m in args.clients:
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--single",
                variant,
                "--clients",
                str(m),
                "--rank",
                str(args.rank),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"M={m} {variant}: {rows[-1]['seconds']:.3f} s", file=sys.stderr)
    dense_bytes = sum(d * k * 4 for d, k in vit_b16_layers().values())
    floor = dense_bytes / bandwidth
    for row in rows:
        ref = next(
            r for r in rows if r["clients"] == row["clients"] and r["variant"] == "fedavg-factors"
        )
        row["ratio_to_fedavg_factors"] = row["seconds"] / ref["seconds"]
        row["ratio_to_dense_write_floor"] = row["seconds"] / floor
    lines = [
        f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s; writing the 48 dense deltas "
        f"({dense_bytes / 2**20:.0f} MiB fp32) takes at least {1e3 * floor:.1f} ms.",
        "",
        "| M | variant | median time (ms) | x FedAvg-factors | x dense-write floor "
        "| peak extra memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['variant']} | {1e3 * row['seconds']:.1f} | "
            f"{row['ratio_to_fedavg_factors']:.2f} | "
            f"{row['ratio_to_dense_write_floor']:.1f} | "
            f"{row['peak_extra_bytes'] / 2**20:.0f} |"
        )
    result = {
        "benchmark": "aggregation",
        "machine": machine(),
        "device": args.device,
        "rank": args.rank,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "dense_write_floor_seconds": floor,
        "variants": VARIANTS,
        "rows": rows,
    }
    save(f"aggregation_{args.device.split(':')[0]}", result, "\n".join(lines))


if __name__ == "__main__":
    main()
