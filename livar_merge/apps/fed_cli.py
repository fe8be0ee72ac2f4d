"""``livar-fed``: run a federated LoRA experiment with LIVAR or a baseline.

Options come from (lowest to highest priority) the defaults (the paper's protocol), ``--preset``,
``--config FILE`` (TOML or JSON) and the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from livar_merge._options import add_dataclass_options, cli_parser, collect_overrides, report_error
from livar_merge.aggregation.registry import available_methods, method_spec
from livar_merge.errors import ConfigError, LivarError
from livar_merge.federated.config import PRESETS, FedConfig, load_config_file, resolve_config

EXAMPLES = """examples:
  livar-fed --preset cpu --dataset digits --method livar --beta 0.05
  livar-fed --preset cpu --method fedavg --beta 0.5 --seed 1 --out runs/fedavg-b0.5-s1
  livar-fed --config my-run.toml --resume --out runs/my-run
  livar-fed --dataset tiny-imagenet --data-root /data --weights vit_b16_in21k.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("livar-fed", __doc__, EXAMPLES)
    parser.add_argument("--config", help="TOML or JSON file of options")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="paper (default: ViT-B/16 in21k, 10 clients, 5x5 epochs), cpu (pretrained "
        "DINOv2 ViT-S/14 at 42 px, 2-core machine, ~1.5 min), cpu-random (random-init small "
        "ViT, the earlier control), tiny (seconds, tests)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed round",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this round (the run can be resumed later)",
    )
    parser.add_argument(
        "--list", choices=["datasets", "methods", "tables"], help="list what is available and exit"
    )
    options = parser.add_argument_group("run options (defaults: the paper's protocol)")
    add_dataclass_options(options, FedConfig)
    return parser


def list_available(what: str) -> None:
    if what == "datasets":
        from livar_merge.federated.datasets import DATASETS

        for name, info in sorted(DATASETS.items()):
            print(f"{name:16s} {getattr(info, 'description', '')}")
    elif what == "methods":
        for name in available_methods():
            spec = method_spec(name)
            print(f"{name:16s} {spec.description} (options: {', '.join(spec.options) or '-'})")
    else:
        from livar_merge.tables import available_tables

        for name, versions in available_tables().items():
            print(f"{name}: versions {versions}")


def run_with_engine(
    config: FedConfig, out: Path, *, resume: bool = False, stop_after: int | None = None
) -> dict[str, Any]:
    """Run ``config`` on its engine (``inprocess``: :func:`run_federated`; ``flower``: the
    Flower Simulation Engine). Returns the summary."""
    if config.engine != "flower":
        from livar_merge.engines.inprocess import run_federated

        return run_federated(config, out, resume=resume, stop_after=stop_after)
    try:
        from livar_merge.flower.server_app import RunControl
        from livar_merge.flower.simulation import run_flower_simulation
    except ImportError as err:
        raise ConfigError(f"--engine flower needs the flower extra: {err}") from err
    control = RunControl(resume=resume, stop_after=stop_after)
    return run_flower_simulation(config, out, control=control)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 for a refused run: bad options before anything is loaded (usage
    error), bad data, weights or folders during the run (``LivarError``/``OSError``; any other
    exception is a bug and keeps its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_available(args.list)
        return 0
    overrides = collect_overrides(args, FedConfig)
    try:
        file_options = load_config_file(args.config) if args.config else {}
        config = resolve_config(args.preset, file_options, overrides)
    except (LivarError, OSError) as err:
        parser.error(str(err))
    out = config.out_dir()
    try:
        summary = run_with_engine(config, out, resume=args.resume, stop_after=args.stop_after)
    except (LivarError, OSError) as err:
        return report_error("livar-fed", err)
    acc = summary["final_accuracy"]
    print(
        f"{summary['run']}: rounds {summary['completed_rounds']}/{summary['rounds']}, "
        f"final top-1 {acc if acc is None else f'{acc:.4f}'}; results in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
