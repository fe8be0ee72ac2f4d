"""Results folder of a run: the one writer (and reader) of both engines' run folders.

One folder per run::

    config.json        resolved options, config hash (and the Flower settings on that engine)
    provenance.json    package versions, git commit, table name/version/checksum, model weights
    partition.csv      clients x classes sample counts of the Dirichlet split
    metrics.csv/.json  per round: test top-1, test loss, train/aggregation/moments seconds
                       (svd merges: svd_discarded_energy, the mean over layers)
    clients.csv        per round and client: samples, train loss/accuracy, steps, seconds, bytes
                       (and lora_rank with --client-ranks)
    alpha.csv          per round, client and layer: omega_A, omega_B, bins, LoRA weight
    head_weights.csv   per round, client and class: head merge weight, sigma, count
    paired.csv         (--paired) per round and paired method: top-1, loss, difference to the
                       run's own method on the same client updates, its cost
    replies.csv        (Flower) one row per reply or silent node: accepted, reason
    svd_energy.csv     (lora_merge svd) per round, layer and stage: the fraction of the exact
                       merged product's energy the svd merge to lora_rank discarded (merge)
                       and, with --client-ranks, what clients of a lower rank did not receive
                       of the global product at the round's start (client-start)
    summary.json       final and best accuracy, wall time (written when every round is done)
    checkpoint/        global.safetensors (global model, server state) and state.json (rows,
                       client memories) after the last completed round, for --resume
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from livar_merge.errors import RunReadError

PACKAGES = (
    "livar",
    "torch",
    "torchvision",
    "timm",
    "peft",
    "numpy",
    "scipy",
    "scikit-learn",
    "shap",
    "pandas",
    "flwr",
)


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the livar checkout (None outside a git checkout)."""
    root = path or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git commit, python and platform, the command line, plus ``extra``."""
    return {
        "packages": package_versions(),
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        **(extra or {}),
    }


def write_run_header(
    out: Path, config: Any, provenance_extra: Mapping[str, Any], **config_extra: Any
) -> None:
    """``config.json`` (resolved options, their hash, ``config_extra``) and ``provenance.json``
    of a run folder; ``config`` is a FedConfig."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "config.json",
        {"config": config.to_dict(), "config_hash": config.config_hash(), **config_extra},
    )
    write_json(out / "provenance.json", provenance(provenance_extra))


def run_summary(
    config: Any,
    metrics: list[dict[str, Any]],
    model_info: Any,
    wall_seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """``summary.json`` of a run from its per-round metrics rows (``test_accuracy`` each)."""
    accuracies = [m["test_accuracy"] for m in metrics]
    return {
        "run": config.run_name(),
        **extra,
        "completed_rounds": len(metrics),
        "rounds": config.rounds,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "accuracy_per_round": accuracies,
        "wall_seconds_this_invocation": wall_seconds,
        "model": model_info.__dict__,
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts with the same keys) as CSV atomically."""
    import pandas as pd

    tmp = path.with_suffix(path.suffix + ".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def aggregation_rows(
    round_index: int, updates: list[Any], result: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """alpha.csv and head_weights.csv rows of one round (the columns livar-fed writes)."""
    d = result.details
    alpha, heads = [], []
    for m, update in enumerate(updates):
        for l, layer in enumerate(result.layer_names):
            row = {
                "round": round_index,
                "client": update.client_id,
                "layer": layer,
                "weight": float(result.lora_weights[m, l]),
            }
            if "omega_a" in d:
                row.update(
                    omega_a=float(d["omega_a"][m, l]),
                    omega_b=float(d["omega_b"][m, l]),
                    bin_a=int(d["bin_a"][m, l]),
                    bin_b=int(d["bin_b"][m, l]),
                )
            alpha.append(row)
        for c in range(result.head.class_weights.shape[1]):
            heads.append(
                {
                    "round": round_index,
                    "client": update.client_id,
                    "class": c,
                    "weight": float(result.head.class_weights[m, c]),
                    "sigma": None if update.class_sigma is None else float(update.class_sigma[c]),
                    "count": None if update.class_counts is None else int(update.class_counts[c]),
                }
            )
    return alpha, heads


# ------------------------------------------------------------------------------ read-back
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.json", "metrics.csv", "summary.json"


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run (its header and at least one round's metrics)."""
    return (path / METRICS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def run_folders(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it is a run folder, else its sub-folders that are (a sweep root)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    if is_run_folder(folder):
        return [folder]
    return [child for child in sorted(folder.iterdir()) if child.is_dir() and is_run_folder(child)]


def read_run_document(folder: Path) -> dict[str, Any]:
    """A run folder's ``config.json`` (``config``: the resolved options, ``config_hash``),
    or :class:`RunReadError` naming the file."""
    path = folder / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunReadError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise RunReadError(f"{path} has no 'config' object")
    return document


def read_run_config(folder: Path) -> dict[str, Any]:
    """The resolved options of a run folder (``config.json``'s ``config``)."""
    return dict(read_run_document(folder)["config"])


def read_run_summary(folder: Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished run, None while rounds remain."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise RunReadError(f"{path} is not a JSON object: {err}") from err
