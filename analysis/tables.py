"""Tables 1-4 of the paper from sweep roots: methods x beta, "mean (std)" over seeds, in percent.

The cells come from :func:`livar_merge.apps.grid_results.results_table` (mean and sample
std over seeds of the final test accuracy; "—" for a missing combination, "[n=1]" for a single
seed) on the runs found by :func:`livar_merge.apps.grid_results.collect_results`. This
module only lays them out as the paper does:

* Tables 1-3: one block of beta columns per dataset (``CIFAR-100 β=1.0``, ...), rows methods.
* Table 4 (ablation): rows FedAvg / +alpha^l / +sigma^(c) / LIVAR, check marks for the two
  components, and an ``Avg (std)`` column.

Each table is written as CSV (cells), Markdown (caption + cells) and the long-form statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.artifacts import ArtifactError, unique_paths
from analysis.style import dataset_name, format_beta, method_name, sort_methods
from livar_merge.apps.grid_results import (
    MISSING_CELL,
    collect_costs,
    collect_results,
    cost_table,
    format_number,
    markdown_table,
    results_table,
)

CHECK = "✓"
ALPHA_COLUMN = "α^l"
SIGMA_COLUMN = "σ^(c)"
ABLATION_METHODS = ("fedavg", "livar-alpha", "livar-sigma", "livar")
ABLATION_MARKS = {
    "fedavg": (False, False),
    "livar-alpha": (True, False),
    "livar-sigma": (False, True),
    "livar": (True, True),
}
# method names of the aggregation registry (livar-fed --method); Fisher merging is "fisher"
PAPER_METHODS = ("fedavg", "regmean", "fisher", "fedproto", "ccvr", "livar")
PAPER_BETAS = (1.0, 0.5, 0.2)


@dataclass(frozen=True)
class TableSpec:
    """Layout of one table: which datasets, methods (rows) and betas (columns)."""

    key: str
    label: str
    caption: str
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    betas: tuple[float, ...]
    ablation: bool = False


PAPER_TABLES: dict[str, TableSpec] = {
    "table1": TableSpec(
        "table1",
        "Table 1",
        "Comparison of approaches on in-distribution datasets",
        ("cifar100", "imagenet-r"),
        PAPER_METHODS,
        PAPER_BETAS,
    ),
    "table2": TableSpec(
        "table2",
        "Table 2",
        "Comparison of approaches on out-of-distribution datasets",
        ("eurosat", "cub200"),
        PAPER_METHODS,
        PAPER_BETAS,
    ),
    "table3": TableSpec(
        "table3",
        "Table 3",
        "Combined performance of LIVAR and CCVR",
        ("cub200",),
        ("ccvr", "livar", "livar+ccvr"),
        PAPER_BETAS,
    ),
    "table4": TableSpec(
        "table4",
        "Table 4",
        "Ablation study on LIVAR components",
        ("cifar100",),
        ABLATION_METHODS,
        (0.05,),
        ablation=True,
    ),
}


@dataclass(frozen=True)
class TableResult:
    """A laid-out table: ``cells`` (strings), ``stats`` (long form), missing cell count."""

    spec: TableSpec
    cells: pd.DataFrame
    stats: pd.DataFrame
    missing: int = 0
    total: int = 0
    files: list[Path] = field(default_factory=list)


def collect_sweeps(roots: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Finished runs of every sweep root (``collect_results``), and the problems met.

    A (dataset, method, beta, seed) found in several roots is counted once (the first).
    """
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    for root in unique_paths([Path(r) for r in roots]):
        if not root.is_dir():
            problems.append(f"sweep root {root} does not exist")
            continue
        try:
            found = collect_results(root)
        except (KeyError, OSError, ValueError) as err:
            problems.append(f"sweep root {root} is unreadable: {err!r}")
            continue
        if not found:
            problems.append(f"sweep root {root} has no finished run (no */summary.json)")
        for row in found:
            key = (row["dataset"], row["method"], float(row["beta"]), int(row["seed"]))
            if key in seen:
                problems.append(f"{root / row['run']} repeats {key}; counted once")
                continue
            seen.add(key)
            rows.append({**row, "root": str(root)})
    return rows, problems


def _beta_column(dataset: str | None, beta: float) -> str:
    prefix = "" if dataset is None else f"{dataset_name(dataset)} "
    return f"{prefix}β={format_beta(beta)}"


def _cells(
    rows: list[dict[str, Any]], spec: TableSpec, dataset: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    subset = [r for r in rows if r["dataset"] == dataset]
    cells, stats = results_table(subset, methods=list(spec.methods), betas=list(spec.betas))
    stats.insert(0, "dataset", dataset)
    return cells, stats


def grid_table(rows: list[dict[str, Any]], spec: TableSpec) -> TableResult:
    """Tables 1-3: methods x (dataset, beta) cells "mean (std)"; missing ones "—"."""
    blocks, all_stats = [], []
    prefix = len(spec.datasets) > 1
    for dataset in spec.datasets:
        cells, stats = _cells(rows, spec, dataset)
        cells.columns = [_beta_column(dataset if prefix else None, b) for b in spec.betas]
        if not prefix:
            cells.columns = [f"{dataset_name(dataset)} {c}" for c in cells.columns]
        blocks.append(cells)
        all_stats.append(stats)
    cells = pd.concat(blocks, axis=1)
    cells.index = pd.Index([method_name(m) for m in spec.methods], name="method")
    stats = pd.concat(all_stats, ignore_index=True)
    missing = int((cells == MISSING_CELL).to_numpy().sum())
    return TableResult(spec, cells, stats, missing, cells.size)


def ablation_table(rows: list[dict[str, Any]], spec: TableSpec) -> TableResult:
    """Table 4: one row per ablation method with check marks and ``Avg (std)`` per beta."""
    (dataset,) = spec.datasets
    cells, stats = _cells(rows, spec, dataset)
    frame = pd.DataFrame(
        {
            ALPHA_COLUMN: [
                CHECK if ABLATION_MARKS.get(m, (False, False))[0] else "" for m in spec.methods
            ],
            SIGMA_COLUMN: [
                CHECK if ABLATION_MARKS.get(m, (False, False))[1] else "" for m in spec.methods
            ],
        },
        index=pd.Index([method_name(m) for m in spec.methods], name="method"),
    )
    for beta, column in zip(spec.betas, cells.columns, strict=True):
        name = "Avg (std)" if len(spec.betas) == 1 else f"Avg (std) {_beta_column(None, beta)}"
        frame[name] = cells[column].to_numpy()
    values = frame.iloc[:, 2:]
    missing = int((values == MISSING_CELL).to_numpy().sum())
    return TableResult(spec, frame, stats, missing, values.size)


def build_table(rows: list[dict[str, Any]], spec: TableSpec) -> TableResult:
    """Lay out ``spec`` from the collected runs (:func:`collect_sweeps`)."""
    return ablation_table(rows, spec) if spec.ablation else grid_table(rows, spec)


def found_specs(rows: list[dict[str, Any]]) -> list[TableSpec]:
    """Tables of whatever the sweeps hold: per dataset all methods x all betas, and the
    ablation layout over all betas where a LIVAR component run (livar-alpha/-sigma) exists."""
    specs = []
    for dataset in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == dataset]
        methods = tuple(sort_methods({r["method"] for r in subset}))
        betas = tuple(sorted({float(r["beta"]) for r in subset}, reverse=True))
        name = dataset_name(dataset)
        specs.append(
            TableSpec(
                f"results-{dataset}",
                f"Results on {name}",
                f"Final test accuracy on {name}",
                (dataset,),
                methods,
                betas,
            )
        )
        if {"livar-alpha", "livar-sigma"} & set(methods):
            specs.append(
                TableSpec(
                    f"ablation-{dataset}",
                    f"Ablation on {name}",
                    f"Ablation study on LIVAR components ({name})",
                    (dataset,),
                    ABLATION_METHODS,
                    betas,
                    ablation=True,
                )
            )
    return specs


def legend_line(result: TableResult) -> str:
    return (
        f"Final test top-1 accuracy (%), mean (std) over seeds; {MISSING_CELL} = no finished "
        f"run ({result.missing} of {result.total} cells); [n=1] = a single seed."
    )


def write_table(result: TableResult, directory: Path) -> list[Path]:
    """Write ``<key>.csv`` (cells), ``<key>.md`` (caption, cells), ``<key>_stats.csv``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = result.spec.key
    csv, md, stats = (
        directory / f"{key}.csv",
        directory / f"{key}.md",
        directory / f"{key}_stats.csv",
    )
    result.cells.to_csv(csv)
    result.stats.to_csv(stats, index=False)
    md.write_text(
        f"**{result.spec.label}**: {result.spec.caption} ({scope(result.spec)}).\n\n"
        f"{markdown_table(result.cells)}\n\n"
        f"{legend_line(result)}\n"
    )
    result.files[:] = [csv, md, stats]
    return [csv, md, stats]


def override_specs(
    specs: dict[str, TableSpec],
    datasets: dict[str, Sequence[str]] | None = None,
    betas: Sequence[float] | None = None,
    ablation_beta: float | None = None,
) -> dict[str, TableSpec]:
    """Paper specs with other datasets (e.g. ``{"table4": ["fashion-mnist"]}``) or betas."""

    out = dict(specs)
    for key, names in (datasets or {}).items():
        if key not in out:
            raise ArtifactError(f"unknown table {key!r}; known: {sorted(out)}")
        if out[key].ablation and len(names) != 1:
            raise ArtifactError(f"{key} is laid out for exactly one dataset, got {list(names)}")
        out[key] = replace(out[key], datasets=tuple(names))
    for key, spec in out.items():
        if spec.ablation and ablation_beta is not None:
            out[key] = replace(spec, betas=(float(ablation_beta),))
        elif not spec.ablation and betas:
            out[key] = replace(spec, betas=tuple(float(b) for b in betas))
    return out


def scope(spec: TableSpec) -> str:
    """``CIFAR-100, ImageNet-R; β 1.0, 0.5, 0.2``."""
    where = ", ".join(dataset_name(d) for d in spec.datasets)
    return f"{where}; β {', '.join(format_beta(b) for b in spec.betas)}"


def describe(result: TableResult) -> str:
    """One line for the catalogue."""
    return f"{scope(result.spec)}; {result.missing} of {result.total} cells missing"


def write_costs(roots: Iterable[str | Path], dataset: str, directory: Path) -> list[Path]:
    """Cost table of ``dataset`` over the sweep roots (:func:`livar_merge.apps.grid_results.
    cost_table`: medians per method of server aggregation time, client work, statistics and
    upload) as ``costs-<dataset>.csv`` and ``.md``."""
    rows = [r for root in unique_paths([Path(r) for r in roots]) for r in collect_costs(root)]
    rows = [r for r in rows if r["dataset"] == dataset]
    if not rows:
        raise ArtifactError(
            f"no finished {dataset} run records costs (metrics.csv aggregation_seconds, "
            "clients.csv upload_bytes, ...)"
        )
    table = cost_table(rows, methods=sort_methods({r["method"] for r in rows}))
    table.index = [method_name(m) for m in table.index]
    directory.mkdir(parents=True, exist_ok=True)
    csv, md = directory / f"costs-{dataset}.csv", directory / f"costs-{dataset}.md"
    table.to_csv(csv, index_label="method")
    md.write_text(
        f"**Costs on {dataset_name(dataset)}**: medians over every round (server, all clients) "
        f"or client-round (per client) of every finished run; {MISSING_CELL} = not recorded.\n\n"
        f"{markdown_table(table.map(format_number))}\n"
    )
    return [csv, md]
