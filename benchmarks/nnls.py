"""Per-layer NNLS (Eq. 4): low-rank Gram route against dense ``scipy.optimize.nnls``.

The low-rank time of a layer is the median of 5 calls after a warm-up; the dense route (forming
the d x k deltas in float64 and solving) is timed once per layer.

All 48 ViT-B/16 LoRA layers, M = 5 clients, r = 16. The dense route forms each d x k delta and
solves the (d*k x M) problem; the low-rank route forms the M x M Gram from the factors and solves
through its Cholesky factor. Both are timed side by side in this run and their lambdas compared.

    python benchmarks/nnls.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save, vit_b16_layers


def main() -> None:
    from livar_calib.nnls import nnls_dense, nnls_lowrank

    rng = np.random.default_rng(0)
    clients, rank = 5, 16
    lowrank_s, dense_s, worst = 0.0, 0.0, 0.0
    per_layer = []
    for layer, (d, k) in vit_b16_layers().items():
        factors = [
            (
                rng.normal(size=(d, rank)).astype(np.float32) / 30,
                rng.normal(size=(rank, k)).astype(np.float32) / 30,
            )
            for _ in range(clients)
        ]
        lam_true = rng.uniform(0, 0.5, size=clients)
        noise = (
            rng.normal(size=(d, rank)).astype(np.float32) / 100,
            rng.normal(size=(rank, k)).astype(np.float32) / 100,
        )
        joint = (
            np.concatenate(
                [lam_true[m] * factors[m][0] for m in range(clients)] + [noise[0]], axis=1
            ),
            np.concatenate([f[1] for f in factors] + [noise[1]], axis=0),
        )
        nnls_lowrank(factors, joint)  # warm-up (first-call BLAS/scipy set-up)
        low_times = []
        for _ in range(5):
            start = time.perf_counter()
            low = nnls_lowrank(factors, joint).lam
            low_times.append(time.perf_counter() - start)
        t_low = float(np.median(low_times))
        start = time.perf_counter()
        dense_clients = np.stack(
            [(u.astype(np.float64) @ v.astype(np.float64)) for u, v in factors]
        )
        dense_joint = joint[0].astype(np.float64) @ joint[1].astype(np.float64)
        lam_dense = nnls_dense(dense_clients, dense_joint)
        t_dense = time.perf_counter() - start
        rel = float(np.max(np.abs(low - lam_dense)) / max(np.max(np.abs(lam_dense)), 1e-300))
        worst = max(worst, rel)
        lowrank_s += t_low
        dense_s += t_dense
        per_layer.append(
            {"layer": layer, "lowrank_s": t_low, "dense_s": t_dense, "max_rel_diff": rel}
        )
        print(
            f"{layer}: low-rank {1e3 * t_low:.1f} ms, dense {1e3 * t_dense:.0f} ms", file=sys.stderr
        )
    speedup = dense_s / lowrank_s
    lines = [
        "| route (48 ViT-B/16 layers, M=5, r=16) | total seconds |",
        "|---|---|",
        f"| low-rank Gram + Cholesky NNLS | {lowrank_s:.3f} |",
        f"| dense deltas + scipy nnls | {dense_s:.2f} |",
        f"| speed-up | {speedup:.0f}x |",
        f"| max relative lambda difference | {worst:.1e} |",
    ]
    save(
        "nnls",
        {
            "benchmark": "nnls",
            "machine": machine(),
            "clients": clients,
            "rank": rank,
            "lowrank_seconds": lowrank_s,
            "dense_seconds": dense_s,
            "speedup": speedup,
            "max_relative_lambda_difference": worst,
            "layers": per_layer,
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
