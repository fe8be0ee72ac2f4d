"""``livar-export``: the final global model of a ``livar-fed`` run, in a form timm and peft load.

The run's model is rebuilt from ``RUN_DIR/config.json`` exactly as the run built it (same seed:
same random initialisation; same weights source otherwise), the final checkpoint
(``checkpoint/global.safetensors``) is loaded into it, and one of two formats is written:

``--to timm FILE``  the merged, complete timm state dict (LoRA folded in, the trained head) as
                    safetensors, which loads with ``strict=True`` into
                    ``timm.create_model(model, num_classes=C, **create_kwargs)``; a sidecar
                    ``FILE.json`` (FILE with ``.json``) names the model, ``num_classes``, the
                    create kwargs, the input normalisation and the provenance. Exact in every
                    merge mode.
``--to peft DIR``   a peft LoRA adapter folder (``adapter_config.json``,
                    ``adapter_model.safetensors`` by peft's ``save_pretrained``, the head as
                    ``modules_to_save``) relative to the pretrained base W0. ``svd``/``factors``
                    runs: the LoRA factors as trained (exact). ``product`` runs fold every
                    round's merge into the frozen weights, so the adapter is the cumulative
                    update (folded weights - W0 + the current LoRA) of every layer re-factorised
                    by truncated SVD to ``--rank`` (default: the run's ``lora_rank``): exact when
                    the update's rank allows, else the relative Frobenius error of every layer
                    is reported. The base is written too (``base_model.safetensors``) unless it
                    is timm's own pretrained checkpoint from the Hugging Face cache
                    (``--base auto``), as a random initialisation, a local file or a converted
                    named source cannot be recreated with timm alone.

Either format is then loaded back from the written files as a user would (fresh timm model,
``PeftModel.from_pretrained``) and compared with the rebuilt run model on the run's test images
(max abs logit difference, top-1, and the run's final ``test_accuracy`` of ``metrics.csv`` when
the whole test set is checked); the result goes into the JSON written beside the output.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import file_sha256, save_tensors, write_json, write_text
from livar_merge._options import check_dataclass, cli_parser, coerce_option, report_error
from livar_merge.errors import ExportError, LivarError
from livar_merge.federated.run_layout import RunLayout, RunReader

if TYPE_CHECKING:
    import torch

    from livar_merge.federated.config import FedConfig
    from livar_merge.federated.model import ModelInfo

FORMATS = ("timm", "peft")
BASE_POLICIES = ("auto", "include", "omit")
BASE_FILE = "base_model.safetensors"
REPORT_FILE = "export.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# a re-factorised layer whose relative Frobenius error is at most this is called exact
EXACT_RELATIVE_ERROR = 1e-5
# an exact format's logits may differ from the run model's by float32 rounding only
EXACT_LOGIT_TOLERANCE = 1e-4
DEFAULT_CHECK_SAMPLES = 512

EXAMPLES = """examples:
  livar-export runs/my-run --to timm exported/my-run.safetensors
  livar-export runs/my-run --to peft exported/my-run-adapter             # rank: the run's
  livar-export runs/my-run --to peft exported/my-run-r32 --rank 32 --check-samples 0
"""

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


# --------------------------------------------------------------------------- checking
@dataclass
class CheckData:
    """The run's test images a check runs on (or random inputs when the data is missing)."""

    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]
    samples: int
    whole_test_set: bool
    source: str


def check_data(run: LoadedRun, samples: int, say: Say = print) -> CheckData:
    """The first ``samples`` images of the run's test set (0: all), normalised as the run did;
    random normal inputs (no labels) when the dataset cannot be loaded here."""
    import numpy as np
    import torch

    from livar_merge.federated.data import BatchSource
    from livar_merge.federated.federation import load_train_test

    config = run.config
    batch = config.eval_batch_size
    try:
        _, _, test = load_train_test(config.dataset, config, config.seed)
    except (LivarError, OSError) as err:
        say(f"note: the run's test set cannot be loaded here ({err}); checking on random inputs")
        count = samples or DEFAULT_CHECK_SAMPLES
        side = config.image_size
        gen = torch.Generator().manual_seed(0)
        x_all = torch.randn(count, 3, side, side, generator=gen)

        def random_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
            for start in range(0, count, batch):
                yield x_all[start : start + batch], None

        return CheckData(random_batches, count, False, "random normal inputs")
    source = BatchSource(test, mean=run.info.mean, std=run.info.std, device=torch.device("cpu"))
    count = len(source) if samples == 0 else min(samples, len(source))
    indices = np.arange(count)

    def test_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        yield from source.batches(indices, batch)

    name = f"{config.dataset} test set" + ("" if count == len(source) else f", first {count}")
    return CheckData(test_batches, count, count == len(source), name)


def logits_of(model: torch.nn.Module, data: CheckData) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits [N, C], labels [N] or None)`` of ``model`` (eval mode, fp32) on the data."""
    import torch

    model.eval()
    outputs, labels = [], []
    with torch.no_grad():
        for x, y in data.batches():
            outputs.append(model(x).float())
            if y is not None:
                labels.append(y)
    return torch.cat(outputs), (torch.cat(labels) if labels else None)


def top1(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """Top-1 accuracy (correct / n, as ``metrics.csv``), None without labels."""
    if labels is None:
        return None
    return int((logits.argmax(1) == labels).sum()) / max(len(labels), 1)


def compare(
    run: LoadedRun,
    reference: tuple[torch.Tensor, torch.Tensor | None],
    exported: torch.nn.Module,
    data: CheckData,
    *,
    exact: bool,
) -> dict[str, Any]:
    """The check record of an exported model against the rebuilt run model."""
    ref_logits, labels = reference
    logits, _ = logits_of(exported, data)
    diff = float((logits - ref_logits).abs().max())
    scale = max(1.0, float(ref_logits.abs().max()))
    record: dict[str, Any] = {
        "inputs": data.source,
        "samples": data.samples,
        "max_abs_logit_diff": diff,
        "max_abs_logit": float(ref_logits.abs().max()),
        "argmax_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).float().mean()),
        "run_model_top1": top1(ref_logits, labels),
        "exported_top1": top1(logits, labels),
        "run_final_test_accuracy": run.final_accuracy,
        "whole_test_set": data.whole_test_set,
    }
    if exact:
        record["tolerance"] = EXACT_LOGIT_TOLERANCE * scale
        record["passed"] = diff <= EXACT_LOGIT_TOLERANCE * scale
    return record


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


# ------------------------------------------------------------------------------- timm
def export_timm(run: LoadedRun, file: Path, data: CheckData, say: Say = print) -> dict[str, Any]:
    """Write the merged timm state dict and its sidecar; returns the sidecar's record."""
    from safetensors.torch import load_file

    state = timm_state(run.model)
    metadata = {"model": run.config.model, "num_classes": str(run.num_classes)}
    save_tensors(file, state, {**metadata, "format": "pt"})
    say(f"wrote {file} ({len(state)} tensors); loading it back into a fresh timm model")
    fresh = create_timm(run)
    fresh.load_state_dict(load_file(str(file)), strict=True)
    reference = logits_of(run.model, data)
    check = compare(run, reference, fresh, data, exact=True)
    record = {
        "format": "timm",
        "exact": True,
        "exactness": "the final global model itself: LoRA merged, head included (every mode)",
        "file": file.name,
        "sha256": sha256_label(file),
        **model_record(run),
        "load": (
            "timm.create_model(model, pretrained=False, num_classes=num_classes, "
            "**create_kwargs).load_state_dict(safetensors.torch.load_file(file), strict=True)"
        ),
        "check": check,
        "warning": protocol_warning(run),
        "run": run_record(run),
        "provenance": export_provenance(),
    }
    write_json(sidecar_path(file), record)
    return record


# ------------------------------------------------------------------------------- peft
@dataclass
class Adapter:
    """LoRA factors per layer (timm module names) and how they were obtained."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A [r, k], B [d, r])
    rank: int
    alpha: float
    method: str
    layers: list[dict[str, Any]]  # per layer: shape, update rank, relative error

    @property
    def max_relative_error(self) -> float:
        return max((layer["relative_error"] for layer in self.layers), default=0.0)

    @property
    def exact(self) -> bool:
        return self.max_relative_error <= EXACT_RELATIVE_ERROR


def max_update_rank(adapter: Adapter) -> int | None:
    """The largest numerical rank of a layer's update (None: factors as trained)."""
    ranks = [layer["update_rank"] for layer in adapter.layers if "update_rank" in layer]
    return max(ranks) if ranks else None


def svd_factors(
    delta: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(A [rank, k], B [d, rank], stats)`` with ``B A`` the truncated SVD of ``delta`` (float64,
    singular values split evenly; zero-padded beyond ``min(d, k)``); stats: the update's
    numerical rank, its Frobenius norm and the relative Frobenius error of the truncation."""
    import torch

    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    d, k = delta.shape
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    factor_b = torch.zeros(d, rank, dtype=torch.float64)
    factor_a = torch.zeros(rank, k, dtype=torch.float64)
    factor_b[:, :keep] = u[:, :keep] * root
    factor_a[:keep] = root[:, None] * vh[:keep]
    total = float(s.square().sum())
    tail = float(s[keep:].square().sum())
    tol = float(s[0]) * max(d, k) * float(torch.finfo(torch.float32).eps) if len(s) else 0.0
    stats = {
        "shape": [int(d), int(k)],
        "update_rank": int((s > tol).sum()) if total > 0 else 0,
        "update_norm": math.sqrt(total),
        "relative_error": math.sqrt(tail / total) if total > 0 else 0.0,
    }
    return factor_a.float(), factor_b.float(), stats


def adapter_of(run: LoadedRun, rank: int | None) -> Adapter:
    """The adapter of the final global model relative to W0 (module docstring)."""
    import torch

    from livar_merge.lora_view import (
        base_weight,
        find_lora_parameters,
        peft_scalings,
        short_layer_name,
    )

    config = run.config
    lora = find_lora_parameters(run.model)
    modules = dict(run.model.named_modules())
    as_trained = config.lora_merge != "product" and rank in (None, config.lora_rank)
    if as_trained:
        factors = {}
        layers = []
        for layer, (factor_a, factor_b) in lora.items():
            name = short_layer_name(layer)
            factors[name] = (factor_a.detach().clone(), factor_b.detach().clone())
            shape = [int(factor_b.shape[0]), int(factor_a.shape[1])]
            layers.append({"layer": name, "shape": shape, "relative_error": 0.0})
        method = "LoRA factors as trained"
        return Adapter(factors, config.lora_rank, config.lora_alpha, method, layers)
    target = rank if rank is not None else config.lora_rank
    scalings = peft_scalings(run.model)
    factors, layers = {}, []
    with torch.no_grad():
        for layer, (factor_a, factor_b) in lora.items():
            name = short_layer_name(layer)
            base = base_weight(modules[layer]).double()
            delta = base - run.pretrained[f"{name}.weight"].double()
            delta += scalings[layer] * (factor_b.double() @ factor_a.double())
            new_a, new_b, stats = svd_factors(delta, target)
            factors[name] = (new_a, new_b)
            layers.append({"layer": name, "rank": target, **stats})
    what = "folded weights - W0 + the current LoRA" if config.lora_merge == "product" else "LoRA"
    method = f"truncated SVD to rank {target} of the cumulative update ({what})"
    return Adapter(factors, target, float(target), method, layers)


def peft_model_of(run: LoadedRun, adapter: Adapter) -> torch.nn.Module:
    """A fresh timm model holding W0 with the adapter and the final head as peft LoRA."""
    import peft
    import torch

    from livar_merge.federated.model import LORA_TARGET_REGEX
    from livar_merge.lora_view import (
        PEFT_PREFIX,
        factor_key,
        head_module,
        lora_config,
        parameter_name,
    )

    base = create_timm(run)
    base.load_state_dict(run.pretrained, strict=True)
    config = lora_config(rank=adapter.rank, alpha=adapter.alpha, target_modules=LORA_TARGET_REGEX)
    model = peft.get_peft_model(base, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (factor_a, factor_b) in adapter.factors.items():
            layer = PEFT_PREFIX + name
            params[parameter_name(factor_key(layer, "A"))].copy_(factor_a)
            params[parameter_name(factor_key(layer, "B"))].copy_(factor_b)
        final, head = head_module(run.model), head_module(model)
        head.weight.copy_(final.weight)
        if head.bias is not None and final.bias is not None:
            head.bias.copy_(final.bias)
    model.eval()
    return model


def hub_checkpoint_text(record: dict[str, Any] | None) -> str:
    """``"; the run's W0 was <file> of <hub id> ..., sha256 <hex>"`` for a Hugging Face cache
    record (:func:`~livar_merge.federated.model.hf_cache_provenance`), else ``""``."""
    if not record or record.get("source") != "hf-cache":
        return ""
    revision = f" at revision {record['revision']}" if record.get("revision") else ""
    return (
        f"; the run's W0 was {record['filename']} of {record['hub_id']}{revision}, sha256 "
        f"{record['sha256']} (check the file timm loads against it)"
    )


def base_policy(run: LoadedRun, base: str) -> tuple[bool, str]:
    """Whether to write W0 beside the adapter, and how a user gets W0."""
    from livar_merge.lora_view import HEAD_OPTION

    from_hub = run.info.weights.startswith("hf-cache:")
    include = base == "include" or (base == "auto" and not from_hub)
    model = run.config.model
    if include:
        how = (
            f"{BASE_FILE} in this folder: the complete timm state dict of W0 (the head in it is "
            f"the run's initial head; the adapter's {HEAD_OPTION} replaces it)"
        )
    elif from_hub:
        how = (
            f"timm's pretrained checkpoint of {model}: timm.create_model({model!r}, "
            "pretrained=True, num_classes=num_classes, **create_kwargs)"
            f"{hub_checkpoint_text(run.info.weights_provenance)}"
        )
    else:
        how = (
            f"NOT written (--base omit): W0 is {run.info.weights!r}, which timm alone cannot "
            "recreate; rebuild it with livar (livar_merge.federated.federation."
            "build_seeded_model with the run's config and seed) or export with --base include"
        )
    return include, how


def readme_text(record: dict[str, Any]) -> str:
    """The README.md of a peft export: what it is, whether it is exact, how to load it."""
    from livar_merge.lora_view import HEAD_OPTION

    kwargs = ", ".join(f"{k}={v!r}" for k, v in record["create_kwargs"].items())
    base_line = (
        f'model.load_state_dict(load_file("{BASE_FILE}"), strict=True)\n'
        if record["base"]["file"]
        else "# load W0 into model first: see 'Base' below\n"
    )
    errors = "\n".join(
        f"| {layer['layer']} | {layer.get('update_rank', '-')} | {layer['relative_error']:.3e} |"
        for layer in record["layers"]
    )
    check = record["check"]
    run = record["run"]
    return f"""# LIVAR federated model: peft LoRA adapter

Exported by `livar-export` from the run `{run["name"]}` ({run["folder"]}): round
{run["completed_rounds"]} of {run["rounds"]}, merge mode `{run["lora_merge"]}`.

* **Exact: {"yes" if record["exact"] else "no"}.** {record["exactness"]}.
* Adapter: {record["method"]}; rank {record["rank"]}, lora_alpha {record["lora_alpha"]},
  target modules `{record["target_modules"]}`, the head as `{HEAD_OPTION}`.
* Check on the {check["inputs"]} ({check["samples"]} samples): max abs logit difference to the
  run's final global model {check["max_abs_logit_diff"]:.3e}; top-1 {check["exported_top1"]}
  (the run's model {check["run_model_top1"]}; metrics.csv's final test accuracy
  {check["run_final_test_accuracy"]}).
* An exact export of any run: `livar-export RUN_DIR --to timm FILE` (a merged timm state dict).

## Base

{record["base"]["how"]}

## Loading

```python
import timm
from peft import PeftModel
from safetensors.torch import load_file

model = timm.create_model({record["model"]!r}, pretrained=False,
                          num_classes={record["num_classes"]}, {kwargs})
{base_line}model = PeftModel.from_pretrained(model, "path/to/this/folder").eval()
```

Inputs: {record["input"]["note"]}; image_size {record["input"]["image_size"]},
mean {record["input"]["mean"]}, std {record["input"]["std"]}.

## Layers (relative Frobenius error of the adapter's update)

| layer | update rank | relative error |
|---|---|---|
{errors}
"""


def export_peft(
    run: LoadedRun,
    out: Path,
    data: CheckData,
    *,
    rank: int | None = None,
    base: str = "auto",
    say: Say = print,
) -> dict[str, Any]:
    """Write the adapter folder (peft ``save_pretrained``, W0 per ``base``, README.md,
    export.json); returns the export.json record."""
    import peft
    from safetensors.torch import load_file, save_file

    from livar_merge.federated.model import LORA_TARGET_REGEX

    say("factorising the update of every LoRA layer")
    adapter = adapter_of(run, rank)
    model = peft_model_of(run, adapter)
    out.mkdir(parents=True, exist_ok=True)
    peft_model: Any = model
    peft_model.save_pretrained(str(out))
    include, how = base_policy(run, base)
    if include:
        save_file(run.pretrained, str(out / BASE_FILE), metadata={"format": "pt"})
    say(f"wrote {out}; loading it back with PeftModel.from_pretrained")
    fresh = create_timm(run)
    fresh.load_state_dict(
        load_file(str(out / BASE_FILE)) if include else run.pretrained, strict=True
    )
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    reference = logits_of(run.model, data)
    check = compare(run, reference, loaded, data, exact=adapter.exact)
    if adapter.exact:
        exactness = (
            "the adapter's update equals the run's (LoRA factors as trained)"
            if adapter.method.startswith("LoRA factors")
            else f"every layer's update has rank <= {adapter.rank}: the SVD keeps all of it"
        )
    else:
        exactness = (
            f"the cumulative update has a higher rank than {adapter.rank}: the truncation "
            f"loses up to {adapter.max_relative_error:.3g} of a layer's update (relative "
            "Frobenius error, per layer below); for an exact export use --to timm, or "
            "--rank at the largest update_rank"
        )
    written = [*PEFT_FILES, BASE_FILE] if include else list(PEFT_FILES)
    record: dict[str, Any] = {
        "format": "peft",
        "exact": adapter.exact,
        "exactness": exactness,
        "method": adapter.method,
        "rank": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": LORA_TARGET_REGEX,
        "files": {name: sha256_label(out / name) for name in written},
        **model_record(run),
        "base": {"file": BASE_FILE if include else None, "weights": run.info.weights, "how": how},
        "max_relative_error": adapter.max_relative_error,
        "max_update_rank": max_update_rank(adapter),
        "layers": adapter.layers,
        "check": check,
        "warning": protocol_warning(run),
        "run": run_record(run),
        "provenance": export_provenance(),
    }
    write_text(out / "README.md", readme_text(record))
    write_json(out / REPORT_FILE, record)
    return record


# -------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("livar-export", __doc__, EXAMPLES)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="results folder of a livar-fed run")
    parser.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "OUT"),
        help="'timm FILE.safetensors' (merged state dict, exact) or 'peft DIR' (LoRA adapter)",
    )
    parser.add_argument(
        "--rank",
        type=positive_int,
        default=None,
        help="peft: adapter rank (default: the run's lora_rank; product runs are re-factorised "
        "by truncated SVD to it)",
    )
    parser.add_argument(
        "--base",
        choices=BASE_POLICIES,
        default="auto",
        help="peft: write W0 as base_model.safetensors: 'auto' (unless it is timm's pretrained "
        "checkpoint from the Hugging Face cache), 'include', 'omit'",
    )
    parser.add_argument(
        "--check-samples",
        type=non_negative_int,
        default=DEFAULT_CHECK_SAMPLES,
        help="test images the export is checked on against the run model (0: the whole test "
        "set, also compared with metrics.csv's final accuracy)",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="export the last completed round of an unfinished run",
    )
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    rank: int | None = None,
    base: str = "auto",
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    partial: bool = False,
    say: Say = print,
) -> dict[str, Any]:
    """Export the final global model of the run in ``run_dir`` as ``fmt`` to ``out``; returns
    the record written beside it. Every refusal comes before the model is built."""
    path = check_output(fmt, out)
    if fmt == "timm" and rank is not None:
        raise ExportError("--rank applies to --to peft only (the timm export is exact)")
    if base not in BASE_POLICIES:
        raise ExportError(f"unknown base policy {base!r}; choose from {BASE_POLICIES}")
    inputs = check_run_folder(run_dir, partial=partial)
    start = time.perf_counter()
    run = load_run(inputs, say)
    data = check_data(run, check_samples, say)
    if fmt == "timm":
        record = export_timm(run, path, data, say)
    else:
        record = export_peft(run, path, data, rank=rank, base=base, say=say)
    record["seconds"] = time.perf_counter() - start
    return record


def summary_lines(record: dict[str, Any], out: Path) -> list[str]:
    """The printed summary of an export."""
    check = record["check"]
    lines = [
        f"{record['format']} export of {record['run']['name']} (round "
        f"{record['run']['completed_rounds']}/{record['run']['rounds']}, "
        f"{record['run']['lora_merge']}) -> {out}",
        f"  exact: {'yes' if record['exact'] else 'no'} ({record['exactness']})",
    ]
    if record["format"] == "peft":
        rank = record["max_update_rank"] or "-"
        lines.append(
            f"  adapter: {record['method']}; max relative Frobenius error "
            f"{record['max_relative_error']:.3e}, max update rank {rank}"
        )
        lines.append(f"  base: {record['base']['how']}")
    lines.append(
        f"  check on {check['inputs']} ({check['samples']} samples): max |logit diff| "
        f"{check['max_abs_logit_diff']:.3e}, top-1 exported {check['exported_top1']} / run model "
        f"{check['run_model_top1']} (metrics.csv final {check['run_final_test_accuracy']})"
    )
    if record.get("warning"):
        lines.append(f"  warning: {record['warning']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 for a refused export (usage, run folder, output); 1 when an exact
    format fails its own check (a bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt, out = args.to
    if fmt not in FORMATS:
        parser.error(f"--to: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "timm" and args.rank is not None:
        parser.error("--rank applies to --to peft only (the timm export is exact)")

    def say(message: str) -> None:
        print(f"livar-export: {message}", file=sys.stderr, flush=True)

    try:
        record = export_run(
            args.run_dir,
            fmt,
            out,
            rank=args.rank,
            base=args.base,
            check_samples=args.check_samples,
            partial=args.partial,
            say=say,
        )
    except (LivarError, OSError) as err:
        return report_error("livar-export", err)
    for line in summary_lines(record, Path(out)):
        print(line)
    if record["check"].get("passed") is False:
        print("livar-export: error: the exported model does not reproduce the run's logits")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
