"""Grids of ``livar-fed`` runs (methods x betas x seeds) and their mean/std tables.

    python -m livar_merge.apps.sweep --preset cpu --dataset fashion-mnist \\
        --methods fedavg livar-alpha livar-sigma livar --betas 0.05 0.5 --seeds 0 1 2 \\
        --root runs/fashion-table

Each run gets its own results folder under ``--root``; finished runs are skipped and interrupted
ones resumed, so the command can be re-run after an interruption. The table is written as CSV
and Markdown (``table.csv``, ``table.md``); a missing cell is marked, not fatal. The costs of each
method (server aggregation per round, client training, statistic passes and upload per client),
medians over every round of every run, go to ``costs.csv`` and ``costs.md``.

``--paired fedavg ...`` gives every run these paired methods (less its own): each round they are
aggregated from the run's own client updates and evaluated (``paired.csv`` of the run). The grid's
``paired.csv``/``paired.md`` then hold, per (method, paired method, beta), the difference
``method - paired method`` in top-1 points on the same updates: over every round, the mean with a
95 % Student-t interval over runs (each seed's mean over its rounds: rounds of one run are not
independent), and over seeds of the final round.

``--engine ray`` runs the grid's unfinished runs as Ray tasks (``--ray-address``,
``--ray-cpus-per-task``, ``--ray-gpus-per-task``: :mod:`livar_merge.engines.ray_engine`); each
task's run folder comes back through Ray, so worker nodes need no shared filesystem.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._options import add_dataclass_options
from livar_merge.apps.fed_cli import run_with_engine
from livar_merge.apps.grid_results import write_table
from livar_merge.engines.ray_engine import (
    EngineOptions,
    FolderTask,
    engine_options,
    import_ray,
    run_folder_tasks,
)
from livar_merge.errors import ConfigError, LivarError, RunFolderError
from livar_merge.federated.config import resolve_config
from livar_merge.federated.run_folder import RunFolder
from livar_merge.federated.run_layout import RunLayout

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig


def run_grid(
    root: Path,
    *,
    preset: str | None,
    methods: Sequence[str],
    betas: Sequence[float],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    paired: Sequence[str] = (),
    engine: EngineOptions | None = None,
) -> list[Path]:
    """Run every (method, beta, seed) not finished yet on the configured engine (in-process
    runs resume where they stopped); returns the run folders. With ``engine.engine == "ray"``
    the unfinished runs are Ray tasks whose folders come back through Ray when they finish."""

    folders, todo = [], []
    for beta in betas:
        for seed in seeds:
            for method in methods:
                options = {**overrides, "method": method, "beta": beta, "seed": seed}
                if [p for p in paired if p != method]:
                    options["paired"] = [p for p in paired if p != method]
                config = resolve_config(preset, None, options)
                folder = root / config.run_name()
                folders.append(folder)
                if RunLayout(folder).is_finished():
                    check_finished_run(folder, config)
                else:
                    todo.append((config, folder))
    if engine is not None and engine.engine == "ray":
        flower = [config.run_name() for config, _ in todo if config.engine == "flower"]
        if flower:
            raise ConfigError(
                f"--engine ray runs livar-fed in-process in each Ray task; {flower[0]} asks for "
                "engine=flower (drop it from --set)"
            )
        tasks = [
            FolderTask(config.run_name(), folder, partial(run_in_folder, config))
            for config, folder in todo
        ]
        run_folder_tasks(tasks, engine, on_report=lambda task, report: _print_run(*report))
        return folders
    for config, folder in todo:
        for report in run_in_folder(config, folder):
            _print_run(*report)
    return folders


def check_finished_run(folder: Path, config: FedConfig) -> None:
    """Refuse a finished run in ``folder`` whose options differ from the grid's ``config``
    (it would be skipped and counted as this grid's cell)."""
    try:
        RunFolder(folder, config).check(resume=True)
    except RunFolderError as err:
        raise RunFolderError(
            f"{folder} holds a finished run of other options than this grid's (it would be "
            f"counted as the grid's {config.run_name()}); move it or choose another --root. {err}"
        ) from err


def run_in_folder(config: FedConfig, folder: Path) -> Iterator[tuple[str, float, float]]:
    """One grid run in ``folder``, resumed from its checkpoint if it has one; yields
    ``(run name, final accuracy, seconds)`` once finished (a task of the ray engine)."""
    start = time.perf_counter()
    resume = RunLayout(folder).state.is_file()
    summary = run_with_engine(config, folder, resume=resume)
    yield config.run_name(), summary["final_accuracy"], time.perf_counter() - start


def _print_run(name: str, accuracy: float, seconds: float) -> None:
    print(f"{name}: {accuracy:.4f} ({seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="livar-sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", required=True, type=Path, help="folder of the grid's runs")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument(
        "--methods", nargs="+", default=["fedavg", "livar-alpha", "livar-sigma", "livar"]
    )
    parser.add_argument("--betas", nargs="+", type=float, default=[0.05, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--paired",
        nargs="*",
        default=[],
        metavar="METHOD",
        help="paired methods of every run (less its own): paired.csv/.md of method - paired",
    )
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="OPTION=VALUE",
        help="livar-fed options for every run, e.g. dataset=fashion-mnist",
    )
    parser.add_argument("--dataset", default=None, help="shorthand for --set dataset=NAME")
    add_dataclass_options(
        parser.add_argument_group(
            "engine options (how the grid's runs are executed; same results; livar-fed's own "
            "engine is --set engine=...)"
        ),
        EngineOptions,
    )
    args = parser.parse_args(argv)
    try:
        engine = engine_options(args)
    except LivarError as err:
        parser.error(str(err))
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    if args.dataset:
        overrides["dataset"] = args.dataset
    overrides.setdefault("progress", "false")
    args.root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.table_only:
        try:
            if engine.engine == "ray":
                import_ray()
            run_grid(
                args.root,
                preset=args.preset,
                methods=args.methods,
                betas=args.betas,
                seeds=args.seeds,
                overrides=overrides,
                paired=args.paired,
                engine=engine,
            )
        except (LivarError, OSError) as err:
            print(f"livar-sweep: error: {err}", file=sys.stderr)
            return 2
    print(write_table(args.root, args.methods, args.betas))
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
