"""The check of an export: the written files loaded back as a user would, against the run model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from livar_merge.apps.export.source import (
    LoadedRun,
    Say,
    export_provenance,
    protocol_warning,
    run_record,
)
from livar_merge.errors import LivarError

if TYPE_CHECKING:
    import torch


# a re-factorised layer whose relative Frobenius error is at most this is called exact
EXACT_RELATIVE_ERROR = 1e-5
# an exact format's logits may differ from the run model's by float32 rounding only
EXACT_LOGIT_TOLERANCE = 1e-4
DEFAULT_CHECK_SAMPLES = 512


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


def checked_record(
    run: LoadedRun, exported: torch.nn.Module, data: CheckData, *, exact: bool
) -> dict[str, Any]:
    """The entries every export record ends with: the check of ``exported`` against the run
    model (:func:`compare`), the run's protocol warning, the run and the export's provenance."""
    check = compare(run, logits_of(run.model, data), exported, data, exact=exact)
    return {
        "check": check,
        "warning": protocol_warning(run),
        "run": run_record(run),
        "provenance": export_provenance(),
    }
