"""Behaviour fingerprint of ``livar-fed``: the configurations a refactor must leave unchanged.

Runs each configuration below on the tiny preset (synthetic data, random 2-block ViT) on the
in-process and the Flower engine, and records per run the sha256 of
``checkpoint/global.safetensors`` and of every CSV without its timing columns (``*seconds*``),
``download_bytes`` (compare those separately when a change touches the transport) and
``node_id`` (Flower draws node ids at random). With ``--compare REF.json`` it reports every run
whose fingerprint differs from the reference's and exits 1 if any does.

    python benchmarks/behaviour_fingerprint.py --out runs/fingerprint            # writes JSON
    python benchmarks/behaviour_fingerprint.py --out runs/fp2 --compare \\
        benchmarks/results/behaviour_fingerprint.json

Float results depend on the CPU's kernels, so compare fingerprints taken on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save

# name -> livar-fed options on top of --preset tiny --seed 0
CONFIGURATIONS: dict[str, list[str]] = {
    "livar": ["--method", "livar"],
    "fedavg-paired": ["--method", "fedavg", "--paired", "livar", "livar-sigma"],
    "livar-svd": ["--method", "livar", "--lora-merge", "svd"],
    "livar-factors": ["--method", "livar", "--lora-merge", "factors"],
    "livar+ccvr": ["--method", "livar+ccvr"],
    "fedproto": ["--method", "fedproto"],
    "regmean": ["--method", "regmean"],
    "fisher": ["--method", "fisher"],
    "livar-omega-cumulative": ["--method", "livar", "--omega-cumulative"],
    "livar-clients-per-round": [
        "--method",
        "livar",
        "--num-clients",
        "4",
        "--clients-per-round",
        "2",
    ],
    "livar-client-ranks": ["--method", "livar", "--client-ranks", "2", "4", "8"],
}
ENGINES = ("inprocess", "flower")
VOLATILE = ("seconds", "download_bytes", "node_id")  # timing; Flower node ids are random


def csv_digest(path: Path) -> str:
    """sha256 of a CSV with its timing columns dropped."""
    import pandas as pd

    frame = pd.read_csv(path)
    keep = [c for c in frame.columns if not any(word in c for word in VOLATILE)]
    buffer = io.StringIO()
    frame[keep].to_csv(buffer, index=False)
    return hashlib.sha256(buffer.getvalue().encode()).hexdigest()


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of the global checkpoint and of every CSV of a finished run folder."""
    out = {
        "global.safetensors": hashlib.sha256(
            (folder / "checkpoint" / "global.safetensors").read_bytes()
        ).hexdigest()
    }
    for path in sorted(folder.glob("*.csv")):
        out[path.name] = csv_digest(path)
    return out


def run(name: str, engine: str, root: Path) -> dict[str, object]:
    folder = root / f"{name}-{engine}"
    if not (folder / "summary.json").is_file():
        command = ["livar-fed", "--preset", "tiny", "--seed", "0", "--engine", engine]
        command += [*CONFIGURATIONS[name], "--out", str(folder)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(f"{name} ({engine}): {time.perf_counter() - start:.0f} s", flush=True)
    return {"name": name, "engine": engine, "files": fingerprint(folder)}


def code_commit() -> str:
    """The commit of the livar code the runs import (``PYTHONPATH`` may point at another
    checkout than this script's)."""
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import livar_merge, pathlib; print(pathlib.Path(livar_merge.__file__).parents[1])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    return subprocess.run(
        ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def compare(runs: list[dict[str, object]], reference: Path) -> list[str]:
    """Lines naming each (run, file) whose digest differs from the reference's."""
    document = json.loads(reference.read_text())
    saved = {(r["name"], r["engine"]): r["files"] for r in document["runs"]}
    lines = []
    for r in runs:
        before = saved.get((r["name"], r["engine"]))
        if before is None:
            lines.append(f"{r['name']} ({r['engine']}): not in the reference")
            continue
        files = r["files"]
        assert isinstance(files, dict)
        for file in sorted(set(files) | set(before)):
            if files.get(file) != before.get(file):
                lines.append(f"{r['name']} ({r['engine']}): {file} differs")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs")
    parser.add_argument("--compare", type=Path, help="a reference fingerprint JSON")
    parser.add_argument("--only", nargs="*", default=list(CONFIGURATIONS), help="configurations")
    args = parser.parse_args()
    runs = [run(name, engine, args.out) for name in args.only for engine in ENGINES]
    commit = code_commit()
    if args.compare:
        differences = compare(runs, args.compare)
        print("\n".join(differences) or f"all {len(runs)} runs identical to {args.compare}")
        sys.exit(1 if differences else 0)
    lines = ["| configuration | engine | global.safetensors sha256 |", "|---|---|---|"]
    lines += [
        f"| {r['name']} | {r['engine']} | {r['files']['global.safetensors'][:16]} |" for r in runs
    ]  # type: ignore[index]
    save("behaviour_fingerprint", {"commit": commit, "runs": runs}, "\n".join(lines))


if __name__ == "__main__":
    main()
