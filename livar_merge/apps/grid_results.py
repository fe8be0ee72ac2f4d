"""A grid's results from its run folders: the accuracy, cost and paired tables of
``livar-sweep`` (and of ``analysis``), written to the grid root (:class:`GridLayout`).

Every run is read through :class:`livar_merge.federated.run_layout.RunReader`; only finished
runs count. Tables: final top-1 "mean (std)" over seeds per (method, beta) with ``—`` for a
missing cell; per method the median costs; per (method, paired method, beta) the paired
difference with its t interval over runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from livar_merge._io import write_csv, write_text
from livar_merge.federated.run_layout import GridLayout, RunReader, run_folders

MISSING_CELL = "—"


def finished_runs(root: Path) -> list[RunReader]:
    """Readers of the finished runs under ``root`` (a run folder or a sweep root)."""
    return [run for run in map(RunReader, run_folders(root)) if run.finished]


def run_key(run: RunReader) -> dict[str, Any]:
    """The grid cell of a run: dataset, method, beta, seed."""
    config = run.config
    return {k: config[k] for k in ("dataset", "method", "beta", "seed")}


def collect_results(root: Path) -> list[dict[str, Any]]:
    """One row per finished run under ``root``: method, dataset, beta, seed, accuracies."""
    rows = []
    for run in finished_runs(root):
        summary = run.summary or {}
        rows.append(
            {
                **run_key(run),
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "run": run.name,
            }
        )
    return rows


# (table of the run folder, column, label in the table, scale): medians per method over every
# row of every finished run; metrics.csv has a row per round, clients.csv per client and round
COST_COLUMNS = (
    ("metrics", "aggregation_seconds", "server aggregation per round (ms)", 1e3),
    ("metrics", "train_seconds", "local work of all clients per round (s)", 1.0),
    ("metrics", "moments_seconds", "CCVR client moment pass per round (s)", 1.0),
    ("clients", "statistics_seconds", "statistics pass per client (s)", 1.0),
    ("clients", "upload_bytes", "upload per client (MB)", 1e-6),
    ("clients", "statistics_bytes", "of which statistics (MB)", 1e-6),
)


def collect_costs(root: Path) -> list[dict[str, Any]]:
    """Long-form cost rows of every finished run: dataset, method, beta, seed, column, value (one
    per row of the run's CSV; a column the run did not record gives no rows)."""
    tables = {table for table, _, _, _ in COST_COLUMNS}
    rows: list[dict[str, Any]] = []
    for run in finished_runs(root):
        frames = {t: run.table(t) for t in tables if run.has_table(t)}
        for table, column, _, _ in COST_COLUMNS:
            if table not in frames or column not in frames[table]:
                continue
            key = run_key(run)
            rows.extend(
                {**key, "column": column, "value": float(v)} for v in frames[table][column].dropna()
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
    for run in finished_runs(root):
        if not run.has_table("paired"):
            continue
        key = run_key(run)
        for row in run.table("paired", ("method", "round", "difference")).to_dict("records"):
            rows.append(
                {
                    "dataset": key["dataset"],
                    "method": key["method"],
                    "paired": row["method"],
                    "beta": key["beta"],
                    "seed": key["seed"],
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
    """The grid's accuracy, cost and (with paired rows) paired tables, as CSV and Markdown in
    ``root``; returns the Markdown."""
    layout = GridLayout(root)
    cells, stats = results_table(collect_results(root), methods=methods, betas=betas)
    write_csv(layout.table_csv, cells, index=True)
    write_csv(layout.table_stats, stats)
    markdown = markdown_table(cells)
    write_text(layout.table_md, markdown + "\n")
    costs = cost_table(collect_costs(root), methods=methods)
    write_csv(layout.costs_csv, costs, index=True)
    costs_markdown = markdown_table(costs.map(format_number))
    write_text(layout.costs_md, costs_markdown + "\n")
    text = markdown + "\n\n" + costs_markdown
    paired = collect_paired(root)
    if paired:
        table = paired_table(paired)
        write_csv(layout.paired_csv, table)
        paired_md = paired_markdown(table)
        write_text(layout.paired_md, paired_md + "\n")
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
