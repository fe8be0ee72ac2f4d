"""Grids of ``livar-fed`` runs (methods x betas x seeds) and their mean/std tables.

    python -m livar_merge.federated.sweep --preset cpu --dataset fashion-mnist \\
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
``--ray-cpus-per-task``, ``--ray-gpus-per-task``: :mod:`livar_merge.federated.ray_engine`); each
task's run folder comes back through Ray, so worker nodes need no shared filesystem.
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from livar_merge._options import add_dataclass_options
from livar_merge.errors import ConfigError, LivarError, RunFolderError
from livar_merge.federated.cli import run_with_engine
from livar_merge.federated.config import resolve_config
from livar_merge.federated.ray_engine import (
    EngineOptions,
    FolderTask,
    engine_options,
    import_ray,
    run_folder_tasks,
)
from livar_merge.federated.results import read_run_config, read_run_summary, run_folders
from livar_merge.federated.run_folder import RunFolder

MISSING_CELL = "—"


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
                if (folder / "summary.json").is_file():
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


def check_finished_run(folder: Path, config: Any) -> None:
    """Refuse a finished run in ``folder`` whose options differ from the grid's ``config``
    (it would be skipped and counted as this grid's cell)."""
    try:
        RunFolder(folder, config).check(resume=True)
    except RunFolderError as err:
        raise RunFolderError(
            f"{folder} holds a finished run of other options than this grid's (it would be "
            f"counted as the grid's {config.run_name()}); move it or choose another --root. {err}"
        ) from err


def run_in_folder(config: Any, folder: Path) -> Iterator[tuple[str, float, float]]:
    """One grid run in ``folder``, resumed from its checkpoint if it has one; yields
    ``(run name, final accuracy, seconds)`` once finished (a task of the ray engine)."""
    start = time.perf_counter()
    resume = (folder / "checkpoint" / "state.json").is_file()
    summary = run_with_engine(config, folder, resume=resume)
    yield config.run_name(), summary["final_accuracy"], time.perf_counter() - start


def _print_run(name: str, accuracy: float, seconds: float) -> None:
    print(f"{name}: {accuracy:.4f} ({seconds:.0f} s)", flush=True)


def collect_results(root: Path) -> list[dict[str, Any]]:
    """One row per finished run under ``root``: method, dataset, beta, seed, accuracies."""
    rows = []
    for folder in run_folders(root):
        summary = read_run_summary(folder)
        if summary is None:
            continue
        config = read_run_config(folder)
        rows.append(
            {
                "dataset": config["dataset"],
                "method": config["method"],
                "beta": config["beta"],
                "seed": config["seed"],
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "run": folder.name,
            }
        )
    return rows


# (file of the run folder, column, label in the table, scale): medians per method over every
# row of every finished run; metrics.csv has a row per round, clients.csv per client and round
COST_COLUMNS = (
    ("metrics.csv", "aggregation_seconds", "server aggregation per round (ms)", 1e3),
    ("metrics.csv", "train_seconds", "local work of all clients per round (s)", 1.0),
    ("metrics.csv", "moments_seconds", "CCVR client moment pass per round (s)", 1.0),
    ("clients.csv", "statistics_seconds", "statistics pass per client (s)", 1.0),
    ("clients.csv", "upload_bytes", "upload per client (MB)", 1e-6),
    ("clients.csv", "statistics_bytes", "of which statistics (MB)", 1e-6),
)


def collect_costs(root: Path) -> list[dict[str, Any]]:
    """Long-form cost rows of every finished run: dataset, method, beta, seed, column, value (one
    per row of the run's CSV; a column the run did not record gives no rows)."""
    files = {file for file, _, _, _ in COST_COLUMNS}
    rows = []
    for run in collect_results(root):
        folder = root / run["run"]
        frames = {f: pd.read_csv(folder / f) for f in files if (folder / f).is_file()}
        for file, column, _, _ in COST_COLUMNS:
            if file not in frames or column not in frames[file]:
                continue
            for value in frames[file][column].dropna():
                rows.append(
                    {
                        "dataset": run["dataset"],
                        "method": run["method"],
                        "beta": run["beta"],
                        "seed": run["seed"],
                        "column": column,
                        "value": float(value),
                    }
                )
    return rows


def cost_table(rows: list[dict[str, Any]], *, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Per method: the median of each cost column over all its rows (scaled to the units of
    its label; NaN where no run recorded it), and the number of finished runs."""
    frame = pd.DataFrame(rows, columns=["dataset", "method", "beta", "seed", "column", "value"])
    methods = list(methods) if methods else sorted(frame["method"].unique())
    medians = frame.pivot_table(index="method", columns="column", values="value", aggfunc="median")
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for _, column, label, scale in COST_COLUMNS:
        values = medians[column] if column in medians else pd.Series(dtype=float)
        table[label] = values.reindex(methods) * scale
    runs = frame.drop_duplicates(["dataset", "method", "beta", "seed"]).groupby("method").size()
    table["runs"] = runs.reindex(methods).fillna(0).astype(int)
    return table


def results_table(
    rows: list[dict[str, Any]],
    *,
    methods: Sequence[str] | None = None,
    betas: Sequence[float] | None = None,
    value: str = "final_accuracy",
    scale: float = 100.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(cells, stats)``: methods x betas cells "mean (std)" over seeds, in percent, and the
    long-form statistics (mean, std with ddof=1, n). Missing combinations read "—"."""
    frame = pd.DataFrame(rows, columns=["method", "beta", "seed", value])
    methods = list(methods) if methods else sorted(frame["method"].unique())
    betas = list(betas) if betas else sorted(frame["beta"].unique(), reverse=True)
    stats = (
        frame.groupby(["method", "beta"])[value]
        .agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else float("nan"), n="count")
        .reset_index()
    )
    cells = pd.DataFrame(
        MISSING_CELL,
        index=pd.Index(methods, name="method"),
        columns=pd.Index([f"beta={b:g}" for b in betas], name=None),
    )
    for _, row in stats.iterrows():
        if row["method"] in methods and row["beta"] in betas:
            std = "" if pd.isna(row["std"]) else f" ({scale * row['std']:.2f})"
            cells.loc[row["method"], f"beta={row['beta']:g}"] = (
                f"{scale * row['mean']:.2f}{std}" + ("" if row["n"] > 1 else " [n=1]")
            )
    return cells, stats


def collect_paired(root: Path) -> list[dict[str, Any]]:
    """Rows of every finished run's ``paired.csv``: method (the run's own), paired method,
    beta, seed, round, and ``gain`` = own top-1 minus the paired method's (same updates)."""
    rows = []
    for run in collect_results(root):
        path = root / run["run"] / "paired.csv"
        if not path.is_file():
            continue
        for row in pd.read_csv(path).to_dict("records"):
            rows.append(
                {
                    "dataset": run["dataset"],
                    "method": run["method"],
                    "paired": row["method"],
                    "beta": run["beta"],
                    "seed": run["seed"],
                    "round": int(row["round"]),
                    "gain": -float(row["difference"]),
                }
            )
    return rows


def paired_table(rows: list[dict[str, Any]], *, scale: float = 100.0) -> pd.DataFrame:
    """Per (method, paired, beta): ``method - paired`` in points over every round: the mean of
    the runs' (seeds') mean gains with its 95 % t interval over runs (the rounds of a run share
    its partition and trajectory, so the run is the independent unit), rounds won and lost;
    and the same over seeds for the final round."""
    from livar_merge.federated.paired import mean_interval

    columns = ["method", "paired", "beta", "seed", "round", "gain"]
    frame = pd.DataFrame(rows, columns=columns)
    out = []
    for (method, paired, beta), group in frame.groupby(["method", "paired", "beta"], sort=True):
        every = mean_interval(list(group.groupby("seed")["gain"].mean() * scale))
        last = group[group["round"] == group["round"].max()]
        final = mean_interval(list(last["gain"] * scale))
        out.append(
            {
                "method": method,
                "paired": paired,
                "beta": beta,
                "n_rounds": len(group),
                "n_runs": every["n"],
                "mean": every["mean"],
                "ci_low": every["low"],
                "ci_high": every["high"],
                "won": int((group["gain"] > 0).sum()),
                "lost": int((group["gain"] < 0).sum()),
                "n_seeds": final["n"],
                "final_mean": final["mean"],
                "final_ci_low": final["low"],
                "final_ci_high": final["high"],
            }
        )
    return pd.DataFrame(out, columns=list(out[0]) if out else ["method", "paired", "beta"])


def paired_markdown(table: pd.DataFrame) -> str:
    """The paired table as Markdown: "mean [low, high]" cells in top-1 points."""

    def cell(mean: Any, low: Any, high: Any) -> str:
        if mean is None or mean != mean:
            return MISSING_CELL
        if low is None or low != low:
            return f"{mean:+.2f}"
        return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"

    lines = [
        "| method − paired | beta | every round: mean [95 % CI over runs] (rounds, runs) | "
        "won/lost | final round: mean [95 % CI] (seeds) |",
        "|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['method']} − {r['paired']} | {r['beta']:g} | "
            f"{cell(r['mean'], r['ci_low'], r['ci_high'])} ({r['n_rounds']}, {r['n_runs']}) | "
            f"{r['won']}/{r['lost']} | "
            f"{cell(r['final_mean'], r['final_ci_low'], r['final_ci_high'])} ({r['n_seeds']}) |"
        )
    return "\n".join(lines)


def write_table(root: Path, methods: Sequence[str] | None, betas: Sequence[float] | None) -> str:
    cells, stats = results_table(collect_results(root), methods=methods, betas=betas)
    cells.to_csv(root / "table.csv")
    stats.to_csv(root / "table_stats.csv", index=False)
    markdown = markdown_table(cells)
    (root / "table.md").write_text(markdown + "\n")
    costs = cost_table(collect_costs(root), methods=methods)
    costs.to_csv(root / "costs.csv")
    costs_markdown = markdown_table(costs.map(format_number))
    (root / "costs.md").write_text(costs_markdown + "\n")
    text = markdown + "\n\n" + costs_markdown
    paired = collect_paired(root)
    if paired:
        table = paired_table(paired)
        table.to_csv(root / "paired.csv", index=False)
        paired_md = paired_markdown(table)
        (root / "paired.md").write_text(paired_md + "\n")
        text += "\n\n" + paired_md
    return text


def format_number(value: float) -> str:
    """Three significant figures without exponents (integers as they are); NaN as the
    missing-cell mark."""
    if isinstance(value, numbers.Integral):
        return str(value)
    if value != value:
        return MISSING_CELL
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}" if value else "0"


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (index as the first column), no optional dependency."""
    header = "| " + " | ".join([frame.index.name or "", *map(str, frame.columns)]) + " |"
    rule = "|" + "---|" * (len(frame.columns) + 1)
    body = ["| " + " | ".join([str(i), *map(str, r)]) + " |" for i, r in frame.iterrows()]
    return "\n".join([header, rule, *body])


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
