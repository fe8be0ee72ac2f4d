"""The report of one run folder: accuracy and loss per round with the paired methods, alpha per
client and layer, the chain of every coefficient (omega -> percentile -> table cell -> raw
value -> normalised alpha), head weights, the partition, per-client training and bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livar_merge.apps.report.page import Page, esc, figure_png, frame_html
from livar_merge.federated.run_layout import RunReader
from livar_merge.lora_view import short_layer_name
from livar_merge.tracking.records import percentiles

CHAIN_SCRIPT = (Path(__file__).parent / "chain.js").read_text()  # selects, the chain


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overview(run: RunReader) -> str:
    config = run.config
    keys = ["dataset", "method", "beta", "seed", "rounds", "num_clients", "lora_rank"]
    keys += ["lora_merge", "table", "model", "weights", "image_size", "partitioner", "paired"]
    rows = [(k, config.get(k)) for k in keys if k in config]
    summary = run.summary or {}
    rows += [
        ("completed rounds", summary.get("completed_rounds", len(run.metrics))),
        ("final top-1", summary.get("final_accuracy")),
        ("engine", summary.get("engine", "inprocess")),
    ]
    provenance = run.provenance
    rows += [
        ("git", (provenance.get("git") or {}).get("commit")),
        ("table used", provenance.get("table")),
        ("data source", provenance.get("dataset_source")),
    ]
    frame = pd.DataFrame(rows, columns=["", "value"])
    return frame_html(frame) + f'<p class="note">folder: {esc(run.path)}</p>'


def curves(run: RunReader) -> str:
    plt = _plt()
    metrics = run.metrics
    paired = run.table("paired") if run.has_table("paired") else pd.DataFrame()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.plot(metrics["round"], metrics["test_accuracy"], "o-", lw=2, label=run.config.get("method"))
    for method, rows in paired.groupby("method") if len(paired) else []:
        ax1.plot(rows["round"], rows["test_accuracy"], "s--", label=f"{method} (paired)")
    ax1.set(xlabel="round", ylabel="test top-1", title="accuracy per round")
    ax1.legend(fontsize=8)
    ax2.plot(metrics["round"], metrics["test_loss"], "o-", color="tab:red")
    ax2.set(xlabel="round", ylabel="test loss", title="loss per round")
    body = figure_png(fig)
    if len(paired):
        table = paired.pivot_table(index="round", columns="method", values="difference")
        body += "<p>Paired differences (paired method's top-1 minus the run's, on the same "
        body += "client updates):</p>"
        body += frame_html(table.reset_index())
    return body


def alpha_heatmaps(alpha: pd.DataFrame) -> str:
    plt = _plt()
    figures, rounds = [], sorted(alpha["round"].unique())
    for r in rounds:
        grid = alpha[alpha["round"] == r].pivot(index="client", columns="layer", values="weight")
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * grid.shape[1]), 1 + 0.4 * grid.shape[0]))
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(grid.shape[0]), grid.index)
        ax.set_xticks(
            range(grid.shape[1]), [_short(n) for n in grid.columns], rotation=90, fontsize=7
        )
        ax.set_title(f"alpha per client and layer, round {r}")
        fig.colorbar(image, ax=ax)
        figures.append(f'<div class="round-fig" data-round="{r}">{figure_png(fig)}</div>')
    options = "".join(
        f'<option value="{r}"{" selected" if r == rounds[-1] else ""}>round {r}</option>'
        for r in rounds
    )
    return f'<p>Round <select id="heat-round">{options}</select></p>' + "".join(figures)


def _short(layer: str) -> str:
    return short_layer_name(layer).replace("blocks.", "b")


def chain_data(run: RunReader, alpha: pd.DataFrame) -> dict[str, Any] | None:
    """Per round the matrices of the coefficient chain, recomputed from the run's omegas with
    the run's table (and checked against what the run recorded)."""
    from livar_merge.coefficients import livar_coefficient_details
    from livar_merge.tables import GShapTable

    if "omega_a" not in alpha.columns:
        return None
    table = GShapTable.load(run.config["table"])
    out: dict[str, Any] = {"table": f"{table.name} v{table.version}", "rounds": {}}
    expected = (run.provenance.get("table") or {}).get("checksum")
    out["table_matches"] = expected is None or table.identity().get("checksum") == expected
    clients = list(dict.fromkeys(alpha["client"]))
    layers = list(dict.fromkeys(alpha["layer"]))
    worst = 0.0
    for r, rows in alpha.groupby("round"):
        grid = {
            k: rows.pivot(index="client", columns="layer", values=k).loc[clients, layers]
            for k in ("omega_a", "omega_b", "bin_a", "bin_b", "weight")
        }
        grid = {k: v.to_numpy() for k, v in grid.items()}
        details = livar_coefficient_details(grid["omega_a"], grid["omega_b"], table)
        worst = max(worst, float(np.abs(details.alpha - grid["weight"]).max()))
        same_bins = np.array_equal(details.bin_a, grid["bin_a"]) and np.array_equal(
            details.bin_b, grid["bin_b"]
        )
        worst = worst if same_bins else float("inf")
        pct = {k: percentiles(grid[f"omega_{k}"]) for k in ("a", "b")}
        out["rounds"][str(int(r))] = {
            "omega_a": grid["omega_a"].tolist(), "omega_b": grid["omega_b"].tolist(),
            "pct_a": pct["a"].tolist(), "pct_b": pct["b"].tolist(),
            "edges_a": list(table.edges_a), "edges_b": list(table.edges_b),
            "cuts_a": details.cuts_a.tolist(), "cuts_b": details.cuts_b.tolist(),
            "bin_a": details.bin_a.tolist(), "bin_b": details.bin_b.tolist(),
            "raw": details.raw.tolist(), "layer_sum": details.raw.sum(axis=0).tolist(),
            "alpha": grid["weight"].tolist(),
        }  # fmt: skip
    out.update(clients=clients, layers=[_short(n) for n in layers], max_alpha_difference=worst)
    return out


def chain_section(chain: dict[str, Any]) -> str:
    check = chain["max_alpha_difference"]
    verdict = (
        f'<p class="note">Recomputed here from the recorded omegas with {esc(chain["table"])}: '
        f"same bins, max |alpha difference| {check:.1e} from alpha.csv.</p>"
        if check <= 1e-9 and chain["table_matches"]
        else '<p class="warn">The recomputation differs from the run\'s record (another table '
        "version or edited files): the values below are this report's, not the run's.</p>"
    )
    return (
        "<p>Pick a round, a client and a layer: the coefficient's omega values, their percentiles "
        "in the round's pooled omegas, the table's percentile edges and cut values, the table "
        "cell, its raw value and the normalisation over the layer's clients (Eq. 5).</p>"
        '<p><select id="chain-round"></select><select id="chain-client"></select>'
        '<select id="chain-layer"></select></p><div id="chain"></div>' + verdict
    )


def heads(run: RunReader) -> str:
    plt = _plt()
    weights = run.table("head_weights")
    last = weights[weights["round"] == weights["round"].max()]
    grid = last.pivot(index="client", columns="class", values="weight")
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.5 * grid.shape[1]), 1 + 0.4 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set(
        xlabel="class", title=f"head weight per class and client, round {int(last['round'].max())}"
    )
    fig.colorbar(image, ax=ax)
    return figure_png(fig)


def partition(run: RunReader) -> str:
    plt = _plt()
    table = pd.read_csv(run.layout.partition, index_col=0)
    counts = table.drop(columns=["total"], errors="ignore")
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.35 * len(counts)))
    left = np.zeros(len(counts))
    for c in counts.columns:
        ax.barh(counts.index, counts[c], left=left, label=str(c))
        left += counts[c].to_numpy()
    ax.set(xlabel="training samples", title="partition: samples per class and client")
    ax.legend(
        ncol=min(10, len(counts.columns)),
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
    )
    return figure_png(fig) + frame_html(table.reset_index())


def clients(run: RunReader) -> str:
    frame = run.table("clients")
    if run.has_table("replies"):
        replies = run.table("replies")
        dropped = replies[~replies["accepted"].astype(bool)]
        body = "<p>Replies dropped, with reasons:</p>" + (
            frame_html(dropped) if len(dropped) else "<p>none</p>"
        )
    else:
        body = ""
    return frame_html(frame) + body


def run_report(run: RunReader) -> Page:
    summary = run.summary or {}
    acc = summary.get("final_accuracy")
    page = Page(
        f"LIVAR run {run.name}",
        f"{run.method} on {run.dataset}, beta {run.beta:g}, seed {run.seed}"
        + (f"; final top-1 {acc:.4f}" if isinstance(acc, float) else "; unfinished"),
    )
    page.add("overview", "Overview", overview(run))
    page.add("curves", "Accuracy and loss", curves(run))
    alpha = run.alpha
    if len(alpha):
        page.add("alpha", "Alpha per client and layer", alpha_heatmaps(alpha))
        chain = chain_data(run, alpha)
        if chain is not None:
            page.data.update(
                chain=chain.pop("rounds"),
                clients=chain["clients"],
                layers=chain["layers"],
                table=chain["table"],
            )
            page.add("why", "Why a client got its weight", chain_section(chain))
    if run.has_table("head_weights"):
        page.add("heads", "Head weights", heads(run))
    if (run.layout.partition).is_file():
        page.add("partition", "Partition", partition(run))
    if run.has_table("clients"):
        page.add("clients", "Clients: training, bytes, replies", clients(run))
    page.script = CHAIN_SCRIPT
    page.data.setdefault("kind", "run")
    return page
