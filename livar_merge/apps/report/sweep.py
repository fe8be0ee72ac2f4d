"""The report of a sweep root (``livar-sweep --root``): the mean/std table, the paired
intervals and the costs, a figure of top-1 against beta per method, and each run's line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from livar_merge.apps.grid_results import collect_results, finished_runs
from livar_merge.apps.report.page import Page, esc, figure_png, frame_html
from livar_merge.federated.run_layout import GridLayout


def sweep_report(root: Path) -> Page:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = finished_runs(root)
    page = Page(f"LIVAR sweep {root.name}", f"{len(runs)} finished runs under {root}")
    results = pd.DataFrame(collect_results(root))
    if len(results):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, rows in results.groupby("method"):
            stats = (
                rows.groupby("beta")["final_accuracy"].agg(["mean", "std", "count"]).reset_index()
            )
            ax.errorbar(
                stats["beta"],
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set(
            xscale="log",
            xlabel="beta (Dirichlet)",
            ylabel="final test top-1",
            title="mean (std over seeds)",
        )
        ax.legend(fontsize=8)
        page.add("figure", "Top-1 against beta", figure_png(fig))
    layout = GridLayout(root)
    for name, heading, path in (
        ("table", "Mean (std) over seeds", layout.table_csv),
        ("paired", "Paired differences", layout.paired_csv),
        ("costs", "Costs", layout.costs_csv),
    ):
        if path.is_file():
            page.add(name, heading, frame_html(pd.read_csv(path)))
    if len(results):
        page.add("runs", "Runs", frame_html(results))
    page.data["kind"] = "sweep"
    page.add(
        "note",
        "Reading the tables",
        '<p class="note">Intervals are over whole runs (seeds), never rounds of one run; '
        f"{esc(layout.paired_md)} says how they are computed.</p>",
    )
    return page
