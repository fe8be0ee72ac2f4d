"""The report of a calibration folder: the table with per-cell rows and intervals, the SHAP
curves, the forest's R^2, the quality report and its verdict, the stage timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livar_calib.folder import FIGURES_DIR, SUMMARY, TABLE_DIR
from livar_merge.apps.report.page import Page, esc, figure_png, frame_html, png_file


def table_figure(
    values: np.ndarray, rows: np.ndarray | None, low: Any, high: Any, edges: dict[str, Any]
) -> str:
    """Heat map of the table, each cell annotated with its value, interval and rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * values.shape[1], 1.2 + 1.0 * values.shape[0]))
    image = ax.imshow(values, cmap="coolwarm", aspect="auto")
    for b in range(values.shape[0]):
        for a in range(values.shape[1]):
            text = f"{values[b, a]:.3f}"
            if low is not None:
                text += f"\n[{low[b][a]:.3f}, {high[b][a]:.3f}]"
            if rows is not None:
                text += f"\nn={int(rows[b, a])}"
            ax.text(a, b, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(values.shape[1]), [f"bin_a {a}" for a in range(values.shape[1])])
    ax.set_yticks(range(values.shape[0]), [f"bin_b {b}" for b in range(values.shape[0])])
    ax.set_title(f"G_SHAP table (edges A {edges.get('A')}, B {edges.get('B')})")
    fig.colorbar(image, ax=ax)
    return figure_png(fig)


def calibration_report(root: Path) -> Page:
    summary = json.loads((root / SUMMARY).read_text())
    table = (
        json.loads(Path(summary["table"]).read_text()) if Path(summary["table"]).is_file() else None
    )
    if table is None:
        found = sorted((root / TABLE_DIR).glob("*.json"))
        table = json.loads(found[-1].read_text()) if found else None
    page = Page(
        f"LIVAR calibration {root.name}",
        f"table {summary['table_identity']['name']} v{summary['table_identity']['version']}; "
        f"{summary['repeats']} repeats, {summary['rows']} rows; evaluation {summary['evaluation']}",
    )
    if table is not None:
        disc = table["provenance"].get("discretisation", {})
        interval = disc.get("cell_interval") or {}
        values = np.asarray(table["values"], dtype=float)
        rows = np.asarray(disc["rows_per_cell"]) if "rows_per_cell" in disc else None
        body = table_figure(
            values, rows, interval.get("low"), interval.get("high"), table["quantile_edges"]
        )
        if interval:
            level, method = esc(interval.get("level")), esc(interval.get("method", ""))
            count = (
                f"{esc(interval.get('resamples'))} resamples of {esc(interval.get('runs'))} runs"
            )
            body += f'<p class="note">Intervals: {level}, {method} ({count}).</p>'
        page.add("table", "The table", body)
    forest = summary.get("forest_metrics") or {}
    if forest:
        frame = pd.DataFrame(forest).T.reset_index().rename(columns={"index": "features"})
        keep = [
            c
            for c in (
                "features",
                "r2",
                "r2_by_run",
                "r2_by_run_low",
                "r2_by_run_high",
                "cv_r2",
                "cv_r2_by_run",
                "n_train",
                "n_test",
            )
            if c in frame
        ]
        page.add(
            "forest",
            "Random forest: R^2",
            frame_html(frame[keep])
            + f'<p class="note">resampling unit: {esc(summary.get("resampling_unit"))}</p>',
        )
    figures = sorted((root / FIGURES_DIR).glob("*.png"))
    trends = summary.get("shap_trend_spearman") or {}
    body = "".join(png_file(p.read_bytes(), p.stem) for p in figures)
    body += (
        "<p>SHAP trend (Spearman of each feature with its SHAP value): "
        + ", ".join(f"{esc(k)} {v:+.2f}" for k, v in trends.items())
        + "</p>"
    )
    page.add("shap", "SHAP curves", body)
    quality = summary.get("quality_summary") or {}
    body = (
        frame_html(pd.DataFrame(quality).T.reset_index().rename(columns={"index": "scheme"}))
        if quality
        else ""
    )
    body += f"<p><b>Verdict:</b> {esc(summary.get('quality_verdict', ''))}</p>"
    downstream = summary.get("downstream")
    if isinstance(downstream, dict) and downstream.get("verdict"):
        body += f"<p><b>Downstream:</b> {esc(downstream['verdict'])}</p>"
    page.add("quality", "Quality report", body)
    timings = summary.get("timings_seconds") or {}
    machine = summary.get("machine") or {}
    frame = pd.DataFrame(sorted(timings.items()), columns=["stage", "seconds"])
    page.add(
        "timings",
        "Stages and machine",
        frame_html(frame) + f'<p class="note">machine: {esc(machine)}</p>',
    )
    page.data["kind"] = "calibration"
    return page
