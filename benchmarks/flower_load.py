"""Load on the Flower Simulation Engine: 100 simulated nodes, 10 sampled per round, 20 rounds.

    python benchmarks/flower_load.py [--nodes 100] [--per-round 10] [--rounds 20]

Runs ``livar-fed --engine flower`` (the ServerApp in this process, ClientApps on Ray) on the
``tiny`` preset on its 1,000 synthetic images split near-IID (beta 10, at least 3 a node), and
watches it from a sampler thread: when ``metrics.csv`` gains a row (a round finished), it
records the time and the resident memory of this process (the ServerApp's side: strategy,
server, global model, run folder). It reports the rounds completed, seconds per round, the
server's memory per round and its growth over the second half of the rounds (a leak grows
linearly; a steady state is flat), and the replies accepted/dropped with reasons
(``replies.csv``). Results: ``benchmarks/results/flower_load.{json,md}`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from common import machine, save

MB = 2**20


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def watch(metrics: Path, samples: list[dict], stop: threading.Event, start: float) -> None:
    seen = 0
    while not stop.is_set():
        rows = 0
        if metrics.is_file():
            rows = max(0, len(metrics.read_text().strip().splitlines()) - 1)
        if rows > seen:
            samples.append({"rounds": rows, "seconds": time.perf_counter() - start,
                            "rss_mb": rss_bytes() / MB})  # fmt: skip
            seen = rows
        stop.wait(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import pandas as pd

    from livar_merge.federated.config import resolve_config
    from livar_merge.flower.simulation import run_flower_simulation

    options = {
        "num_clients": args.nodes,
        "clients_per_round": args.per_round,
        "rounds": args.rounds,
        "max_train": 1000,  # the synthetic dataset's size: 10 images a node at 100 nodes
        "beta": 10.0,  # near-IID, so that a seeded Dirichlet split gives every node >= 3
        "min_client_samples": 3,
        "client_cpus": 1.0,
        "threads": 1,
    }
    config = resolve_config("tiny", None, options)
    out = Path(tempfile.mkdtemp(prefix="flower-load-")) / "run"
    samples: list[dict] = []
    stop = threading.Event()
    start = time.perf_counter()
    rss_start = rss_bytes() / MB
    sampler = threading.Thread(target=watch, args=(out / "metrics.csv", samples, stop, start))
    sampler.start()
    try:
        summary = run_flower_simulation(config, out)
    finally:
        stop.set()
        sampler.join()
    total = time.perf_counter() - start
    replies = pd.read_csv(out / "replies.csv")
    dropped = replies[~replies["accepted"]]
    metrics = pd.read_csv(out / "metrics.csv")
    per_round = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(samples)]
    half = [s for s in samples if s["rounds"] > args.rounds // 2]
    growth = (
        (half[-1]["rss_mb"] - half[0]["rss_mb"]) / (half[-1]["rounds"] - half[0]["rounds"])
        if len(half) >= 2
        else None
    )
    result = {
        "machine": machine(),
        "config": options | {"preset": "tiny", "lora_merge": config.lora_merge},
        "completed_rounds": summary["completed_rounds"],
        "final_accuracy": summary["accuracy_per_round"][-1],
        "total_seconds": total,
        "seconds_per_round_median": sorted(per_round)[len(per_round) // 2] if per_round else None,
        "server_rss_mb_before": rss_start,
        "server_rss_mb_per_round": [round(s["rss_mb"], 1) for s in samples],
        "server_rss_growth_mb_per_round_second_half": growth,
        "replies": len(replies),
        "replies_accepted": int(replies["accepted"].sum()),
        "replies_dropped": len(dropped),
        "drop_reasons": dropped["reason"].value_counts().to_dict(),
        "distinct_clients_trained": int(replies.loc[replies["accepted"], "client"].nunique()),
        "accepted_per_round": metrics["replies_accepted"].tolist(),
    }
    rss = result["server_rss_mb_per_round"]
    md = "\n".join(
        [
            f"# Flower Simulation Engine load: {args.nodes} nodes, {args.per_round} sampled per "
            f"round, {args.rounds} rounds (tiny preset)",
            "",
            f"- rounds completed: {result['completed_rounds']} of {args.rounds}; replies "
            f"accepted {result['replies_accepted']} of {result['replies']}, dropped "
            f"{result['replies_dropped']} {result['drop_reasons'] or ''}; "
            f"{result['distinct_clients_trained']} distinct clients trained",
            f"- wall time {total:.1f} s, median {result['seconds_per_round_median']:.2f} s per "
            "round",
            f"- server RSS before {rss_start:.0f} MB; after round 1 {rss[0]:.0f} MB, after the "
            f"last {rss[-1]:.0f} MB; growth over the second half "
            f"{growth if growth is None else f'{growth:+.2f}'} MB per round",
            f"- machine: {json.dumps(result['machine'])}",
        ]
    )
    save("flower_load", result, md)


if __name__ == "__main__":
    main()
