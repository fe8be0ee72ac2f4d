"""Figures of federated runs: per-round test accuracy per method, and the per-layer alpha.

Accuracy curves: runs are grouped by (dataset, method, beta); for every round the mean and the
sample standard deviation (ddof=1; none for a single seed) of the test top-1 accuracy over the
seeds, in percent. One figure per dataset, one panel per beta, one line (mean) and band
(mean ± std) per method.

Accuracy against beta: the final test top-1 of each finished sweep run, mean ± std (ddof=1) over
seeds per (method, beta), beta on a log axis; one figure per dataset.

Paired differences against beta: from the runs' ``paired.csv`` (``livar-fed --paired``), the
difference ``method - reference`` in top-1 points on the same client updates, mean and 95 %
Student-t interval over every (seed, round) per (method, beta); one line per method run with the
reference as a paired method, beta on a log axis.

Alpha heat map: the LoRA merge weight of each client (rows) and layer (columns) of one run,
read from ``alpha.csv``, one panel per round.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.style import (
    SEQUENTIAL_CMAP,
    FigureOutput,
    dataset_name,
    finish,
    format_beta,
    method_colour,
    method_name,
    new_figure,
    sort_methods,
    styled,
)
from livar_merge.errors import ArtifactError
from livar_merge.federated.run_layout import RunReader

CURVE_KEYS = ("dataset", "method", "beta")


def accuracy_table(runs: Sequence[RunReader]) -> pd.DataFrame:
    """Long form: one row per (run, round) with ``dataset, method, beta, seed, run, round,
    accuracy`` (percent)."""
    frames = []
    for run in runs:
        metrics = run.metrics
        frames.append(
            pd.DataFrame(
                {
                    "dataset": run.dataset,
                    "method": run.method,
                    "beta": run.beta,
                    "seed": run.seed,
                    "run": run.name,
                    "round": metrics["round"].astype(int),
                    "accuracy": 100.0 * metrics["test_accuracy"].astype(float),
                }
            )
        )
    columns = [*CURVE_KEYS, "seed", "run", "round", "accuracy"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def accuracy_curves(runs: Sequence[RunReader]) -> pd.DataFrame:
    """Per (dataset, method, beta, round): ``mean``, ``std`` (ddof=1, NaN for one seed), ``n``."""
    table = accuracy_table(runs)
    return (
        table.groupby([*CURVE_KEYS, "round"])["accuracy"]
        .agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else float("nan"), n="count")
        .reset_index()
    )


def plot_accuracy_curves(
    curves: pd.DataFrame, dataset: str, path: str | os.PathLike[str], *, title: str | None = None
) -> FigureOutput:
    """Test accuracy per round of every method on ``dataset``, one panel per beta.

    ``data``: ``series`` ((beta, method) -> DataFrame ``round, mean, std, n``), ``betas``,
    ``methods``.
    """
    subset = curves.loc[curves["dataset"] == dataset]
    if subset.empty:
        raise ArtifactError(f"no accuracy curves for dataset {dataset!r}")
    betas = sorted(subset["beta"].unique(), reverse=True)
    methods = sort_methods(subset["method"].unique())
    series: dict[tuple[float, str], pd.DataFrame] = {}
    title = title or (f"Test accuracy per round on {dataset_name(dataset)} (mean ± std over seeds)")
    with styled():
        figure, axes = new_figure(len(betas), sharey=True, width=4.0, height=3.2)
        for ax, beta in zip(axes, betas, strict=True):
            for i, method in enumerate(methods):
                part = subset.loc[(subset["beta"] == beta) & (subset["method"] == method)]
                if part.empty:
                    continue
                part = part.sort_values("round")[["round", "mean", "std", "n"]].reset_index(
                    drop=True
                )
                series[(float(beta), method)] = part
                colour = method_colour(method, i)
                seeds = int(part["n"].max())
                ax.plot(
                    part["round"],
                    part["mean"],
                    color=colour,
                    marker="o",
                    ms=3,
                    label=f"{method_name(method)} (n={seeds})",
                )
                std = part["std"].fillna(0.0)
                ax.fill_between(
                    part["round"],
                    part["mean"] - std,
                    part["mean"] + std,
                    color=colour,
                    alpha=0.18,
                    lw=0,
                )
            ax.set_title(f"β = {format_beta(beta)}")
            ax.set_xlabel("communication round")
            rounds = subset["round"].unique()
            ax.set_xticks(sorted(int(r) for r in rounds))
        axes[0].set_ylabel("test top-1 accuracy (%)")
        axes[0].legend(loc="best")
        return finish(
            figure,
            path,
            title,
            {"series": series, "betas": [float(b) for b in betas], "methods": methods},
        )


def seed_range(counts: pd.Series) -> str:
    """``n=3``, or ``n=1-3`` when the points of a line have different numbers of seeds."""
    low, high = int(counts.min()), int(counts.max())
    return f"n={high}" if low == high else f"n={low}-{high}"


def _beta_line(ax, beta, mean, error, method: str, i: int, label: str) -> None:
    """One method's points with error bars against beta."""
    ax.errorbar(
        beta,
        mean,
        yerr=error,
        color=method_colour(method, i),
        marker="o",
        ms=4,
        capsize=3,
        label=label,
    )


def _beta_axis(ax, betas: list[float], ylabel: str) -> None:
    """Log-beta x axis with the betas as ticks, labels and legend."""
    ax.set_xscale("log")
    ax.set_xticks(betas, [format_beta(b) for b in betas])
    ax.minorticks_off()
    ax.set_xlabel("Dirichlet β (smaller = more heterogeneous)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize="small")


def plot_accuracy_vs_beta(
    rows: Sequence[dict], dataset: str, path: str | os.PathLike[str], *, title: str | None = None
) -> FigureOutput:
    """Final test accuracy of every method on ``dataset`` against the Dirichlet beta.

    ``rows``: finished runs as :func:`analysis.tables.collect_sweeps` returns them. ``data``:
    ``stats`` (DataFrame ``method, beta, mean, std, n`` in percent), ``methods``, ``betas``.
    """
    from livar_merge.apps.grid_results import results_table

    subset = [r for r in rows if r["dataset"] == dataset]
    if not subset:
        raise ArtifactError(f"no finished sweep runs for dataset {dataset!r}")
    _, stats = results_table(subset)
    stats = stats.assign(mean=100.0 * stats["mean"], std=100.0 * stats["std"])
    methods = sort_methods(stats["method"].unique())
    betas = sorted(float(b) for b in stats["beta"].unique())
    title = title or f"Final accuracy on {dataset_name(dataset)} vs β (mean ± std over seeds)"
    with styled():
        figure, (ax,) = new_figure(1, width=6.0, height=3.8)
        for i, method in enumerate(methods):
            part = stats.loc[stats["method"] == method].sort_values("beta")
            label = f"{method_name(method)} ({seed_range(part['n'])})"
            _beta_line(ax, part["beta"], part["mean"], part["std"].fillna(0.0), method, i, label)
        _beta_axis(ax, betas, "final test top-1 accuracy (%)")
        return finish(
            figure,
            path,
            title,
            {"stats": stats.reset_index(drop=True), "methods": methods, "betas": betas},
        )


def plot_paired_vs_beta(
    rows: Sequence[dict],
    dataset: str,
    path: str | os.PathLike[str],
    *,
    reference: str = "fedavg",
    title: str | None = None,
) -> FigureOutput:
    """``method - reference`` on the same client updates against beta, with 95 % intervals.

    ``rows``: :func:`livar_merge.apps.grid_results.collect_paired` rows. ``data``: ``table``
    (:func:`livar_merge.apps.grid_results.paired_table` rows of ``reference``), ``methods``,
    ``betas``.
    """
    from livar_merge.apps.grid_results import paired_table

    subset = [r for r in rows if r["dataset"] == dataset and r["paired"] == reference]
    if not subset:
        raise ArtifactError(f"no paired rows against {reference!r} for dataset {dataset!r}")
    table = paired_table(subset)
    methods = sort_methods(table["method"].unique())
    betas = sorted(float(b) for b in table["beta"].unique())
    title = title or (
        f"{dataset_name(dataset)}: minus {method_name(reference)} on the same updates "
        "(mean, 95 % CI)"
    )
    with styled():
        figure, (ax,) = new_figure(1, width=6.0, height=3.8)
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
        for i, method in enumerate(methods):
            part = table.loc[table["method"] == method].sort_values("beta")
            mean = part["mean"].to_numpy(dtype=float)
            low = part["ci_low"].to_numpy(dtype=float)
            high = part["ci_high"].to_numpy(dtype=float)
            error = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
            label = f"{method_name(method)} (runs={int(part['n_runs'].min())})"
            _beta_line(ax, part["beta"].to_numpy(dtype=float), mean, error, method, i, label)
        _beta_axis(ax, betas, f"top-1 minus {method_name(reference)} (points)")
        return finish(
            figure,
            path,
            title,
            {"table": table.reset_index(drop=True), "methods": methods, "betas": betas},
        )


def short_layer_name(layer: str) -> str:
    """``base_model.model.blocks.3.attn.qkv`` -> ``3.attn.qkv``."""
    return re.sub(r"^(base_model\.model\.)?(blocks\.)?", "", layer)


def alpha_matrix(alpha: pd.DataFrame, round_index: int) -> pd.DataFrame:
    """Clients x layers LoRA merge weights of one round, in the order they appear in the file."""
    part = alpha.loc[alpha["round"] == round_index]
    if part.empty:
        raise ArtifactError(f"alpha.csv has no round {round_index}")
    clients = list(dict.fromkeys(part["client"]))
    layers = list(dict.fromkeys(part["layer"]))
    matrix = part.pivot_table(index="client", columns="layer", values="weight", aggfunc="first")
    return matrix.reindex(index=clients, columns=layers)


def choose_rounds(
    available: Sequence[int], rounds: Sequence[int] | str, max_panels: int = 6
) -> list[int]:
    """Rounds to draw: ``"all"`` (at most ``max_panels``, evenly spaced, first and last kept),
    ``"last"``, or an explicit list (those present)."""
    available = sorted(int(r) for r in available)
    if rounds == "last":
        return available[-1:]
    if rounds == "all":
        if len(available) <= max_panels:
            return available
        picks = np.unique(np.round(np.linspace(0, len(available) - 1, max_panels)).astype(int))
        return [available[i] for i in picks]
    wanted = [int(r) for r in rounds]
    return [r for r in wanted if r in available]


def plot_alpha_heatmap(
    run: RunReader,
    path: str | os.PathLike[str],
    *,
    rounds: Sequence[int] | str = "all",
    title: str | None = None,
) -> FigureOutput:
    """Per-layer LoRA merge weight alpha (clients x layers) of a run, one panel per round.

    ``data``: ``matrices`` (round -> clients x layers DataFrame of ``weight``), ``rounds``.
    Each layer's column sums to 1 over the clients.
    """
    alpha = run.alpha
    chosen = choose_rounds(alpha["round"].unique(), rounds)
    if not chosen:
        raise ArtifactError(f"none of the rounds {rounds} is in {run.layout.table('alpha')}")
    matrices = {r: alpha_matrix(alpha, r) for r in chosen}
    vmax = max(float(np.nanmax(m.to_numpy())) for m in matrices.values())
    n_layers = max(m.shape[1] for m in matrices.values())
    n_clients = max(m.shape[0] for m in matrices.values())
    width = min(max(6.5, 0.16 * n_layers + 2.5), 14.0)
    height = max(1.5, 0.22 * n_clients + 0.7)
    title = title or (
        f"LoRA merge weight α per client and layer\n{method_name(run.method)} on "
        f"{dataset_name(run.dataset)}, β = {format_beta(run.beta)}, seed {run.seed}"
    )
    with styled():
        figure, axes = new_figure(1, len(chosen), width=width, height=height)
        figure.set_figheight(height * len(chosen) + 1.2)
        image = None
        for ax, r in zip(axes, chosen, strict=True):
            matrix = matrices[r]
            image = ax.imshow(
                matrix.to_numpy(dtype=np.float64),
                aspect="auto",
                cmap=SEQUENTIAL_CMAP,
                vmin=0.0,
                vmax=vmax,
                interpolation="nearest",
            )
            ax.set_yticks(range(matrix.shape[0]), list(matrix.index))
            layers = [short_layer_name(str(c)) for c in matrix.columns]
            step = max(1, len(layers) // 24)
            ax.set_xticks(range(0, len(layers), step), layers[::step], rotation=90, fontsize=6)
            if ax is not axes[-1]:
                ax.tick_params(labelbottom=False)
            ax.grid(False)
            ax.set_title(f"round {r}")
            ax.set_ylabel("client")
        axes[-1].set_xlabel("LoRA layer")
        figure.colorbar(image, ax=axes, label="α (weight of the client's LoRA)", shrink=0.9)
        return finish(figure, path, title, {"matrices": matrices, "rounds": chosen})
