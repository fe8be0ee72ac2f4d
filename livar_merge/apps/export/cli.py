"""The ``livar-export`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from livar_merge._options import (
    add_dataclass_options,
    check_dataclass,
    cli_parser,
    coerce_option,
    collect_overrides,
    option,
    report_error,
)
from livar_merge.apps.export.check import DEFAULT_CHECK_SAMPLES, check_data
from livar_merge.apps.export.peft_writer import export_peft
from livar_merge.apps.export.source import (
    FORMATS,
    Say,
    check_output,
    check_run_folder,
    load_run,
)
from livar_merge.apps.export.timm_writer import export_timm
from livar_merge.errors import ExportError, LivarError

EXAMPLES = """examples:
  livar-export runs/my-run --to timm exported/my-run.safetensors
  livar-export runs/my-run --to peft exported/my-run-adapter             # rank: the run's
  livar-export runs/my-run --to peft exported/my-run-r32 --rank 32 --check-samples 0
"""


@dataclass(frozen=True)
class ExportOptions:
    """The options of an export, declared once: the ``--rank``, ``--base``,
    ``--check-samples`` and ``--partial`` flags and :func:`export_run`'s checks come from here."""

    rank: int | None = option(
        None,
        "peft: adapter rank (default: exact: the factors as trained, or for product runs the "
        "largest numerical rank of a layer's update; a smaller rank truncates and says what is "
        "lost)",
        ge=1,
    )
    base: Literal["auto", "include", "omit"] = option(
        "auto",
        "peft: write W0 as base_model.safetensors: 'auto' (unless it is timm's pretrained "
        "checkpoint from the Hugging Face cache), 'include', 'omit'",
    )
    check_samples: int = option(
        DEFAULT_CHECK_SAMPLES,
        "test images the export is checked on against the run model (0: the whole test set, "
        "also compared with metrics.csv's final accuracy)",
        ge=0,
    )
    partial: bool = option(False, "export the last completed round of an unfinished run")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOptions:
        """The options given on the command line (the others keep their defaults)."""
        given = collect_overrides(args, cls)
        return cls(**{k: coerce_option(cls, k, v) for k, v in given.items()})


def build_parser() -> argparse.ArgumentParser:
    """``livar-export RUN_DIR --to FORMAT OUT`` and the :class:`ExportOptions` flags."""
    doc = importlib.import_module("livar_merge.apps.export").__doc__
    parser = cli_parser("livar-export", doc, EXAMPLES)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="results folder of a livar-fed run")
    parser.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "OUT"),
        help="'timm FILE.safetensors' (merged state dict, exact) or 'peft DIR' (LoRA adapter)",
    )
    add_dataclass_options(parser.add_argument_group("export options"), ExportOptions)
    return parser


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    say: Say = print,
) -> dict[str, Any]:
    """Export the final global model of the run in ``run_dir`` as ``fmt`` to ``out``; returns
    the record written beside it. Every refusal comes before the model is built."""
    path = check_output(fmt, out)
    try:
        check_dataclass(options)
    except LivarError as err:
        raise ExportError(str(err)) from err
    if fmt == "timm" and options.rank is not None:
        raise ExportError("--rank applies to --to peft only (the timm export is exact)")
    inputs = check_run_folder(run_dir, partial=options.partial)
    start = time.perf_counter()
    run = load_run(inputs, say)
    data = check_data(run, options.check_samples, say)
    if fmt == "timm":
        record = export_timm(run, path, data, say)
    else:
        record = export_peft(run, path, data, rank=options.rank, base=options.base, say=say)
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
    try:
        options = ExportOptions.from_args(args)
    except LivarError as err:
        parser.error(str(err))
    if fmt == "timm" and options.rank is not None:
        parser.error("--rank applies to --to peft only (the timm export is exact)")

    def say(message: str) -> None:
        print(f"livar-export: {message}", file=sys.stderr, flush=True)

    try:
        record = export_run(args.run_dir, fmt, out, options, say=say)
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
