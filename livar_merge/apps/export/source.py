"""The run to export: its checked folder, the rebuilt model and its provenance."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import file_sha256
from livar_merge._options import check_dataclass, coerce_option
from livar_merge.errors import ExportError, LivarError
from livar_merge.federated.run_layout import RunLayout, RunReader

if TYPE_CHECKING:
    import torch

    from livar_merge.federated.config import FedConfig
    from livar_merge.federated.model import ModelInfo

FORMATS = ("timm", "peft")
REPORT_FILE = "export.json"  # the record beside a peft adapter (timm: the FILE.json sidecar)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

Say = Callable[[str], None]


# ------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class RunInputs:
    """The checked files of a run folder (nothing heavy loaded yet)."""

    folder: Path
    config: FedConfig
    config_hash: str
    finished: bool
    provenance: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return RunLayout(self.folder).global_tensors


def fed_config(options: dict[str, Any], where: Path) -> FedConfig:
    """The FedConfig of a run's resolved options, each coerced and checked as declared."""
    from livar_merge.federated.config import FIELD_NAMES, FedConfig

    unknown = sorted(set(options) - FIELD_NAMES)
    if unknown:
        raise ExportError(
            f"{where}: options {unknown} are not livar-fed options of this livar version"
        )
    try:
        config = FedConfig(**{k: coerce_option(FedConfig, k, v) for k, v in options.items()})
        check_dataclass(config)
    except LivarError as err:
        raise ExportError(f"{where}: {err}") from err
    return config


def check_run_folder(run_dir: str | Path, *, partial: bool = False) -> RunInputs:
    """Refuse a folder that is no finished ``livar-fed`` run (before anything heavy is loaded):
    no ``config.json``, no checkpoint, an unfinished run (unless ``partial``), options or a
    config hash this livar version does not reproduce."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ExportError(f"run folder {folder} does not exist")
    run = RunReader(folder)
    layout = run.layout
    if not layout.config.is_file():
        raise ExportError(f"{folder} holds no run: {layout.config.name} is missing")
    for path in (layout.global_tensors, layout.state):
        if not path.is_file():
            raise ExportError(
                f"{folder} has no checkpoint ({path.relative_to(folder)} is missing): the run "
                "has not completed a round"
            )
    if not run.finished and not partial:
        raise ExportError(
            f"{folder}: the run is not finished ({layout.summary.name} is missing); finish it "
            "with livar-fed --resume, or pass --partial to export its last completed round"
        )
    config_path = layout.config
    config = fed_config(run.config, config_path)
    saved_hash = run.config_hash
    if saved_hash != config.config_hash():
        raise ExportError(
            f"{config_path}: its config hash {saved_hash} is not the hash this livar version "
            f"computes for its options ({config.config_hash()}); it cannot rebuild this run's "
            "model reliably"
        )
    return RunInputs(folder, config, str(saved_hash), run.finished, run.provenance)


def check_output(fmt: str, out: str | Path) -> Path:
    """Refuse an unknown format or an existing output: a timm FILE (``.safetensors``) or its
    sidecar that exists, a peft DIR that is a file or a non-empty folder."""
    path = Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "timm":
        if path.suffix != ".safetensors":
            raise ExportError(f"--to timm FILE: {path} must end in .safetensors")
        for existing in (path, sidecar_path(path)):
            if existing.exists():
                raise ExportError(f"{existing} already exists; choose another FILE")
    elif path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise ExportError(f"{path} already exists and is not an empty folder; choose another DIR")
    return path


def sidecar_path(file: Path) -> Path:
    """The JSON beside a timm export (``model.safetensors`` -> ``model.json``)."""
    return file.with_suffix(".json")


def create_kwargs(config: FedConfig) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments (besides ``num_classes``) the run used."""
    return {"img_size": config.image_size, **config.architecture_overrides()}


# --------------------------------------------------------------------------- the model
@dataclass
class LoadedRun:
    """The rebuilt run model holding the final global model, and what the export needs."""

    inputs: RunInputs
    model: torch.nn.Module  # the peft model (CPU, fp32, eval mode)
    info: ModelInfo
    num_classes: int
    pretrained: dict[str, torch.Tensor]  # W0: the complete timm state dict before round 1
    completed_rounds: int
    final_accuracy: float | None  # metrics.csv's test_accuracy of the last completed round

    @property
    def config(self) -> FedConfig:
        return self.inputs.config


def checkpoint_classes(path: Path) -> int:
    """The number of classes of a checkpoint (rows of ``head/weight``), read lazily."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if "head/weight" not in set(handle.keys()):
            raise ExportError(f"{path} holds no head/weight: not a livar-fed checkpoint")
        return int(handle.get_slice("head/weight").get_shape()[0])


def timm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete timm state dict of a peft LoRA model, LoRA merged (peft's own
    ``merge_and_unload`` on a copy) and the trained head in place; ``model`` is unchanged."""
    peft_model: Any = copy.deepcopy(model)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def load_run(inputs: RunInputs, say: Say = print) -> LoadedRun:
    """Rebuild the run's model from its config (seeded as the run), keep W0, load the final
    checkpoint. Refuses a checkpoint that does not fit the rebuilt model or another weights
    source than the run's (a named source whose converted file differs)."""
    import torch

    from livar_merge.federated.federation import build_seeded_model
    from livar_merge.federated.run_folder import RunFolder

    config = inputs.config
    if config.threads:
        torch.set_num_threads(config.threads)
    num_classes = checkpoint_classes(inputs.checkpoint)
    say(f"rebuilding {config.model} ({config.weights}, {num_classes} classes, seed {config.seed})")
    model, info = build_seeded_model(config, num_classes, config.seed)
    model.eval()
    recorded = inputs.provenance.get("model_weights")
    if recorded is not None and recorded != info.weights:
        from livar_merge.federated import pretrained

        if pretrained.is_source_name(config.weights) or info.weights == "random":
            raise ExportError(
                f"the run's weights were {recorded!r}; rebuilt here from {info.weights!r}"
            )
        say(f"note: the run's weights were {recorded!r}, rebuilt from {info.weights!r}")
    w0 = timm_state(model)
    folder = RunFolder(inputs.folder, config)
    try:
        folder.load_checkpoint(model)
    except LivarError as err:
        raise ExportError(
            f"{inputs.checkpoint} does not fit the model rebuilt from config.json: {err}"
        ) from err
    model.eval()
    metrics = folder.rows.metrics
    final = float(metrics[-1]["test_accuracy"]) if metrics else None
    return LoadedRun(inputs, model, info, num_classes, w0, folder.rows.completed_rounds, final)


def create_timm(run: LoadedRun) -> torch.nn.Module:
    """A fresh timm model of the run's architecture (no weights loaded)."""
    import timm

    kwargs = create_kwargs(run.config)
    return timm.create_model(
        run.config.model, pretrained=False, num_classes=run.num_classes, **kwargs
    )


# ------------------------------------------------------------------------- provenance
def sha256_label(path: Path) -> str:
    """``sha256:<hex>`` of a file, as export records name a file's digest."""
    return f"sha256:{file_sha256(path)}"


def run_record(run: LoadedRun) -> dict[str, Any]:
    """What the export says about the run it came from."""
    config = run.config
    return {
        "folder": str(run.inputs.folder.resolve()),
        "name": config.run_name(),
        "config_hash": run.inputs.config_hash,
        "method": config.method,
        "lora_merge": config.lora_merge,
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "protocol": config.protocol,
        "rounds": config.rounds,
        "completed_rounds": run.completed_rounds,
        "finished": run.inputs.finished,
        "final_test_accuracy": run.final_accuracy,
        "weights": run.info.weights,
        # named sources and the Hugging Face cache: what identifies W0 (hub id, sha256, ...)
        "weights_provenance": run.info.weights_provenance,
        "run_git": run.inputs.provenance.get("git"),
    }


def export_provenance() -> dict[str, Any]:
    from livar_merge.federated.results import git_commit, package_versions

    return {
        "git": git_commit(),
        "packages": package_versions(("livar", "torch", "timm", "peft", "safetensors")),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def model_record(run: LoadedRun) -> dict[str, Any]:
    """How to create the model and feed it: name, classes, create kwargs, normalisation."""
    return {
        "model": run.config.model,
        "num_classes": run.num_classes,
        "create_kwargs": create_kwargs(run.config),
        "input": {
            "image_size": run.config.image_size,
            "mean": list(run.info.mean),
            "std": list(run.info.std),
            "note": "RGB pixels scaled to [0, 1] (grey repeated to 3 channels), resized to "
            "image_size, then (x - mean) / std",
        },
    }


def protocol_warning(run: LoadedRun) -> str | None:
    """Released-protocol runs report another model than the global one they keep."""
    if run.config.protocol != "released":
        return None
    return (
        "--protocol released: metrics.csv scores W0 + the last round's sample-weighted product "
        "(not kept in the checkpoint); this export is the installed global model the clients "
        "continue from, whose accuracy differs"
    )
