"""What a run folder records beside its tables: provenance, the header, the summary and the
aggregation rows (layout and reader: :mod:`livar_merge.federated.run_layout`; writer:
:class:`livar_merge.federated.run_folder.RunFolder`)."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import write_json
from livar_merge.federated.migrations import OPTIONS_VERSION
from livar_merge.federated.run_layout import LAYOUT_VERSION, RunLayout

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig

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
    out: Path, config: FedConfig, provenance_extra: Mapping[str, Any], **config_extra: Any
) -> None:
    """``config.json`` (resolved options, their hash, ``config_extra``) and ``provenance.json``
    of a run folder; ``config`` is a FedConfig."""
    layout = RunLayout(out)
    write_json(
        layout.config,
        {
            "config": config.to_dict(),
            "config_hash": config.config_hash(),
            "layout_version": LAYOUT_VERSION,
            "options_version": OPTIONS_VERSION,
            **config_extra,
        },
    )
    write_json(layout.provenance, provenance(provenance_extra))


def run_summary(
    config: FedConfig,
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
