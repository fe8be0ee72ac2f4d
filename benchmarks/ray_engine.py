"""Serial against Ray engine: wall time of the same small calibration, and the identity check.

Runs ``livar-calibrate`` three times, side by side in fresh folders, each in its own process
(start-up, imports and, for Ray, starting a local Ray included): ``--engine serial`` with 2 and
with 1 torch thread, then ``--engine ray`` with one CPU and one torch thread per task (2 tasks at
a time on a 2-core machine; Ray starts locally with every core). The speed-up is against the
faster serial run. ``--threads`` enters no hash and, on this proxy,
no result. Then checks that the outputs are the same: every CSV (rows, quality, SHAP values,
downstream, per-round rows) byte for byte, every safetensors file tensor by tensor, the table's
values and its config hash.

    python benchmarks/ray_engine.py [--betas 0.3 1.0] [--seeds 0 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save


def calibrate(out: Path, options: list[str]) -> dict[str, Any]:
    """One ``livar-calibrate`` process: wall time and the stage timings it recorded."""
    command = [sys.executable, "-m", "livar_calib.cli", "--out", str(out), *options]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"command": command[1:], "wall_seconds": wall, "stages": summary["timings_seconds"]}


def identity(a: Path, b: Path) -> dict[str, Any]:
    """Which files of two calibration folders hold the same results (see the module doc)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from livar_merge import GShapTable

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def tensors(path: Path) -> dict[str, Any]:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118

    names = files(a)
    csv = sorted(n for n in names if n.endswith(".csv"))
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    different_csv = [n for n in csv if (a / n).read_bytes() != (b / n).read_bytes()]
    different_tensors = []
    for name in safetensors:
        ta, tb = tensors(a / name), tensors(b / name)
        if ta.keys() != tb.keys() or not all(torch.equal(v, tb[k]) for k, v in ta.items()):
            different_tensors.append(name)
    paths = [json.loads((r / "summary.json").read_text())["table"] for r in (a, b)]
    tables = [GShapTable.load(path) for path in paths]
    result = {
        "same_file_names": names == files(b),
        "csv_files": len(csv),
        "csv_different": different_csv,
        "safetensors_files": len(safetensors),
        "safetensors_different": different_tensors,
        "table_values_equal": bool(np.array_equal(tables[0].values, tables[1].values)),
        "table_config_hash_equal": tables[0].provenance["config_hash"]
        == tables[1].provenance["config_hash"],
    }
    result["identical"] = (
        result["same_file_names"]
        and not different_csv
        and not different_tensors
        and result["table_values_equal"]
        and result["table_config_hash_equal"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", nargs="+", default=["0.3", "1.0"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--rounds", default="2")
    parser.add_argument("--local-epochs", default="2")
    args = parser.parse_args()
    options = [
        "--preset",
        "tiny",
        "--betas",
        *args.betas,
        "--seeds",
        *args.seeds,
        "--rounds",
        args.rounds,
        "--local-epochs",
        args.local_epochs,
    ]
    runs = len(args.betas) * len(args.seeds)
    with tempfile.TemporaryDirectory(prefix="livar-ray-bench-") as tmp:
        root = Path(tmp)
        serial = calibrate(root / "serial", [*options, "--threads", "2"])
        print(f"serial, 2 threads: {serial['wall_seconds']:.1f} s", file=sys.stderr)
        serial_1 = calibrate(root / "serial-1", [*options, "--threads", "1"])
        print(f"serial, 1 thread: {serial_1['wall_seconds']:.1f} s", file=sys.stderr)
        engine = ["--engine", "ray", "--ray-cpus-per-task", "1"]
        ray = calibrate(root / "ray", [*options, "--threads", "1", *engine])
        print(f"ray: {ray['wall_seconds']:.1f} s", file=sys.stderr)
        check = identity(root / "serial", root / "ray")
        check_1 = identity(root / "serial", root / "serial-1")
    best = min(serial, serial_1, key=lambda r: r["wall_seconds"])
    load = os.getloadavg()
    result = {
        "machine": machine(),
        "load_average_after": load,
        "calibration": {"options": options, "proxy_runs": runs},
        "serial": serial,
        "serial_1_thread": serial_1,
        "ray": ray,
        "speedup_wall_vs_faster_serial": best["wall_seconds"] / ray["wall_seconds"],
        "speedup_proxy_training_vs_faster_serial": best["stages"]["proxy_training"]
        / ray["stages"]["proxy_training"],
        "identity": check,
        "identity_serial_1_thread": check_1,
    }
    md = "\n".join(
        [
            f"# Serial vs Ray engine: tiny calibration, {runs} (beta, seed) runs",
            "",
            f"machine: {result['machine']['cpu_count']} CPU cores (shared; load average "
            f"{load[0]:.1f} after the runs)",
            "",
            "| engine | wall (s) | proxy training stage (s) |",
            "|---|---|---|",
            f"| serial (2 torch threads) | {serial['wall_seconds']:.1f} | "
            f"{serial['stages']['proxy_training']:.1f} |",
            f"| serial (1 torch thread) | {serial_1['wall_seconds']:.1f} | "
            f"{serial_1['stages']['proxy_training']:.1f} |",
            f"| ray (1 CPU, 1 thread per task) | {ray['wall_seconds']:.1f} | "
            f"{ray['stages']['proxy_training']:.1f} |",
            "",
            f"speed-up of ray over the faster serial run: wall "
            f"{result['speedup_wall_vs_faster_serial']:.2f}x, proxy training "
            f"{result['speedup_proxy_training_vs_faster_serial']:.2f}x",
            "",
            f"ray's outputs identical to serial: {check['identical']} ({check['csv_files']} CSV "
            f"files byte for byte, {check['safetensors_files']} safetensors files tensor by "
            "tensor, table values, config hash); serial with 1 thread identical to 2 threads: "
            f"{check_1['identical']}",
        ]
    )
    save("ray_engine", result, md)


if __name__ == "__main__":
    main()
