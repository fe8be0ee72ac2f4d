"""Regenerate every figure and table the given artifacts allow, and catalogue the outcome.

Layout of ``out``::

    figures/   figure2, figureA, figure3-imagenet-r, figureB-cifar100, ... (PNG + PDF each),
               table-heatmap-*, table-comparison, accuracy-<dataset>, alpha-<run>,
               accuracy-vs-beta-<dataset>, paired-vs-beta-<dataset> (sweeps run with --paired)
    tables/    table1..table4, results-<dataset>, ablation-<dataset> (.csv, .md, _stats.csv),
               aposteriori_agreement.{csv,json}, aposteriori_curves.csv, accuracy_curves.csv,
               costs-<dataset>, paired-<dataset> (.csv, .md)
    catalogue.json

An item whose inputs are absent is *skipped* with the reason; an unexpected error marks it
*failed* (and the command exits 1) without stopping the others.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.artifacts import (
    ArtifactError,
    CalibrationRun,
    load_table,
    unique_paths,
)
from analysis.catalogue import Catalogue
from analysis.federated_figures import (
    accuracy_curves,
    plot_accuracy_curves,
    plot_accuracy_vs_beta,
    plot_alpha_heatmap,
    plot_paired_vs_beta,
)
from analysis.shap_figures import plot_aposteriori, plot_shap_summary
from analysis.style import LAMBDA, OMEGA_A, OMEGA_B, dataset_name, format_beta, method_name
from analysis.table_figures import plot_table_comparison, plot_table_heatmap, table_label
from analysis.tables import (
    PAPER_TABLES,
    build_table,
    collect_sweeps,
    describe,
    found_specs,
    override_specs,
    write_costs,
    write_table,
)
from livar_merge.apps.grid_results import collect_paired, paired_markdown, paired_table
from livar_merge.federated.run_layout import RunReader, run_folders

# a posteriori datasets of the paper (Sec. 5.4, Appendix C): normalised name -> (file, label)
PAPER_APOSTERIORI = {
    "imagenetr": ("imagenet-r", "figure3", "Figure 3"),
    "cifar100": ("cifar100", "figureB", "Figure B"),
    "eurosat": ("eurosat", "figureC", "Figure C"),
    "cub200": ("cub200", "figureD", "Figure D"),
}
LIVAR_WEIGHTED = ("livar", "livar-alpha", "livar+ccvr")

Producer = Callable[[], tuple[list[Path], str]]


def normalise_name(name: str) -> str:
    """``ImageNet-R`` / ``imagenet_r`` -> ``imagenetr``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _produce(
    catalogue: Catalogue, id: str, label: str, producer: Producer, sources: Sequence[Any] = ()
) -> None:
    try:
        files, detail = producer()
    except ArtifactError as err:
        catalogue.skipped(id, label, str(err))
    except Exception as err:  # a bug or a corrupt file: record it, go on with the others
        catalogue.failed(id, label, err)
    else:
        catalogue.made(id, label, files, detail=detail, sources=[str(s) for s in sources])


class Regeneration:
    """One regeneration into ``out``; call :meth:`run`."""

    def __init__(
        self,
        out: str | Path,
        *,
        calibration: str | Path | None = None,
        a_posteriori: Sequence[tuple[str | None, str | Path]] = (),
        runs: Sequence[str | Path] = (),
        sweeps: Sequence[str | Path] = (),
        reference_table: str = "paper-table-a",
        tables: Sequence[str] = (),
        bins: int = 20,
        table_datasets: dict[str, Sequence[str]] | None = None,
        betas: Sequence[float] | None = None,
        ablation_beta: float | None = None,
        alpha_rounds: Sequence[int] | str = "all",
    ) -> None:
        self.out = Path(out)
        self.figures = self.out / "figures"
        self.tables_dir = self.out / "tables"
        self.calibration_path = None if calibration is None else Path(calibration)
        self.a_posteriori = [(n, Path(p)) for n, p in a_posteriori]
        self.runs = [Path(p) for p in runs]
        self.sweeps = [Path(p) for p in sweeps]
        self.reference_table = reference_table
        self.extra_tables = list(tables)
        self.bins = bins
        self.specs = override_specs(PAPER_TABLES, table_datasets, betas, ablation_beta)
        self.alpha_rounds = alpha_rounds
        self.catalogue = Catalogue(
            self.out,
            inputs={
                "calibration": None if calibration is None else str(calibration),
                "a_posteriori": [[n, str(p)] for n, p in self.a_posteriori],
                "runs": [str(p) for p in self.runs],
                "sweeps": [str(p) for p in self.sweeps],
                "reference_table": reference_table,
                "tables": self.extra_tables,
                "bins": bins,
            },
        )
        self._calibration: CalibrationRun | None = None

    # ------------------------------------------------------------------ calibration
    def calibration(self) -> CalibrationRun:
        if self.calibration_path is None:
            raise ArtifactError("no proxy calibration run given (--calibration DIR)")
        if self._calibration is None:
            self._calibration = CalibrationRun.open(self.calibration_path)
        return self._calibration

    def figure2(self) -> tuple[list[Path], str]:
        cal = self.calibration()
        out = plot_shap_summary(
            cal.shap(),
            self.figures / "figure2",
            bins=self.bins,
            title=f"Figure 2: SHAP of {OMEGA_A} and {OMEGA_B} quantiles in predicting {LAMBDA} "
            f"(proxy {dataset_name(cal.name)})",
        )
        return out.files, f"{len(cal.rows)} rows, {self.bins} bins"

    def figure_a(self) -> tuple[list[Path], str]:
        cal = self.calibration()
        out = plot_shap_summary(
            cal.shap(samples=True),
            self.figures / "figureA",
            bins=self.bins,
            title=f"Figure A: SHAP with the number of samples as third feature "
            f"(proxy {dataset_name(cal.name)})",
        )
        shares = ", ".join(f"{k} {v:.3g}" for k, v in out.data["mean_abs_shap"].items())
        return out.files, f"mean |SHAP|: {shares}"

    # ------------------------------------------------------------------ a posteriori
    def aposteriori(self) -> None:
        given: dict[str, tuple[str, Path]] = {}
        problems = []
        for name, path in self.a_posteriori:
            try:
                run = CalibrationRun.open(path, name)
            except ArtifactError as err:
                problems.append((name or str(path), err))
                continue
            key = normalise_name(run.name)
            if key in given:
                problems.append(
                    (
                        run.name,
                        ArtifactError(
                            f"{path}: a run on {run.name} was already given ({given[key][1]})"
                        ),
                    )
                )
                continue
            given[key] = (run.name, path)
        for name, err in problems:
            self.catalogue.skipped(f"aposteriori-{name}", f"A posteriori ({name})", str(err))
        rows: list[dict[str, Any]] = []
        curves: list[pd.DataFrame] = []
        items = [(key, *PAPER_APOSTERIORI[key]) for key in PAPER_APOSTERIORI]
        items += [
            (key, name, f"aposteriori-{name}", "A posteriori")
            for key, (name, _) in given.items()
            if key not in PAPER_APOSTERIORI
        ]
        for key, default_name, file, label in items:
            if key not in given:
                self.catalogue.skipped(
                    file,
                    f"{label} ({dataset_name(default_name)})",
                    f"no calibration run on {default_name} given "
                    f"(--a-posteriori {default_name}=DIR)",
                )
                continue
            name, path = given[key]
            stem = file if file.startswith("aposteriori-") else f"{file}-{default_name}"

            def producer(
                name: str = name, path: Path = path, stem: str = stem, label: str = label
            ) -> tuple[list[Path], str]:
                return self._aposteriori_one(name, path, stem, label, rows, curves)

            _produce(self.catalogue, file, f"{label} ({dataset_name(name)})", producer, [path])
        if rows:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame(rows)
            csv = self.tables_dir / "aposteriori_agreement.csv"
            js = self.tables_dir / "aposteriori_agreement.json"
            cv = self.tables_dir / "aposteriori_curves.csv"
            frame.to_csv(csv, index=False)
            js.write_text(json.dumps(json.loads(frame.to_json(orient="records")), indent=2) + "\n")
            pd.concat(curves, ignore_index=True).to_csv(cv, index=False)
            summary = "; ".join(
                f"{r['dataset']} {r['feature']} ρ={r['spearman']:.2f}" for r in rows
            )
            self.catalogue.made(
                "aposteriori-agreement",
                "A posteriori agreement (Spearman)",
                [csv, js, cv],
                detail=summary,
            )
        else:
            self.catalogue.skipped(
                "aposteriori-agreement",
                "A posteriori agreement (Spearman)",
                "no a posteriori figure was made",
            )

    def _aposteriori_one(
        self,
        name: str,
        path: Path,
        stem: str,
        label: str,
        rows: list[dict[str, Any]],
        curves: list[pd.DataFrame],
    ) -> tuple[list[Path], str]:
        try:
            cal = self.calibration()
        except ArtifactError as err:
            raise ArtifactError(f"needs the proxy's calibration run: {err}") from err
        run = CalibrationRun.open(path, name)
        try:
            table = cal.table()
            note = f"proxy table {table_label(table)} fixed"
        except ArtifactError:
            table = load_table(self.reference_table)
            note = f"proxy run has no table; edges of {table_label(table)}"
        out = plot_aposteriori(
            run.shap(),
            cal.shap(),
            table,
            self.figures / stem,
            dataset=name,
            proxy=cal.name,
            bins=self.bins,
            title=f"{label + ': ' if label.startswith('Figure') else ''}a posteriori SHAP "
            f"analysis on {dataset_name(name)} vs the proxy {dataset_name(cal.name)} "
            "(G_SHAP table fixed)",
        )
        for feature, agreement in out.data["agreement"].items():
            bins = out.data["table_bins"].get(feature, {})
            rows.append(
                {
                    "dataset": name,
                    "proxy": cal.name,
                    "feature": feature,
                    **agreement,
                    "table_edges": bins.get("edges"),
                    "proxy_table_bin_means": bins.get("proxy"),
                    "dataset_table_bin_means": bins.get("dataset"),
                }
            )
            for source, curve in (
                ("dataset", out.data["curves"][feature]),
                ("proxy", out.data["proxy_curves"][feature]),
            ):
                curves.append(curve.assign(dataset=name, feature=feature, source=source))
        rho = ", ".join(f"{f} ρ={a['spearman']:.2f}" for f, a in out.data["agreement"].items())
        return out.files, f"{note}; Spearman {rho}"

    # ------------------------------------------------------------------ G_SHAP tables
    def table_figures(self) -> None:
        def heatmap(table, name: str, title: str) -> tuple[list[Path], str]:
            out = plot_table_heatmap(table, self.figures / f"table-heatmap-{name}", title=title)
            return out.files, table_label(table)

        def calibrated() -> tuple[list[Path], str]:
            table = self.calibration().table()
            return heatmap(table, "calibration", f"Calibrated G_SHAP table {table_label(table)}")

        def reference() -> tuple[list[Path], str]:
            table = load_table(self.reference_table)
            return heatmap(table, "reference", f"G_SHAP table {table_label(table)} (reference)")

        def comparison() -> tuple[list[Path], str]:
            left = self.calibration().table()
            right = load_table(self.reference_table)
            out = plot_table_comparison(left, right, self.figures / "table-comparison")
            if out.data["difference"] is None:
                return out.files, "shapes differ: no difference panel"
            return out.files, f"max |difference| {abs(out.data['difference']).max():.3g}"

        _produce(
            self.catalogue,
            "table-heatmap-calibration",
            "G_SHAP table heat map (calibrated)",
            calibrated,
            [self.calibration_path] if self.calibration_path else [],
        )
        _produce(
            self.catalogue,
            "table-heatmap-reference",
            f"G_SHAP table heat map ({self.reference_table})",
            reference,
            [self.reference_table],
        )
        _produce(
            self.catalogue,
            "table-comparison",
            f"G_SHAP tables side by side (calibrated vs {self.reference_table})",
            comparison,
        )
        for i, name in enumerate(self.extra_tables):

            def extra(name: str = name, i: int = i) -> tuple[list[Path], str]:
                table = load_table(name)
                out = plot_table_heatmap(
                    table, self.figures / f"table-heatmap-{i + 1}-{table.name}.v{table.version}"
                )
                return out.files, table_label(table)

            _produce(
                self.catalogue,
                f"table-heatmap-{i + 1}",
                f"G_SHAP table heat map ({name})",
                extra,
                [name],
            )

    # ------------------------------------------------------------------ federated runs
    def federated(self) -> None:
        explicit = unique_paths([f for p in self.runs for f in run_folders(p)])
        swept = unique_paths([f for p in self.sweeps for f in run_folders(p)])
        for given in self.runs:
            if not run_folders(given):
                self.catalogue.skipped(
                    f"run-{given.name}",
                    f"Run folder {given}",
                    "no run folder (config.json + metrics.csv) there",
                )
        folders = unique_paths(explicit + swept)
        if not folders:
            reason = (
                "no run folders given (--runs / --sweeps)"
                if not (self.runs or self.sweeps)
                else "no run folder (config.json + metrics.csv) under the given paths"
            )
            self.catalogue.skipped("accuracy", "Accuracy curves", reason)
            self.catalogue.skipped("alpha", "Per-layer alpha heat maps", reason)
            return
        runs, unreadable = [], []
        for folder in folders:
            try:
                runs.append(RunReader.open(folder))
            except ArtifactError as err:
                unreadable.append(str(err))
        finished = [r for r in runs if r.finished]
        unfinished = [r.name for r in runs if not r.finished]
        if unfinished or unreadable:
            self.catalogue.skipped(
                "accuracy-unfinished",
                "Accuracy curves of unfinished runs",
                f"{len(unfinished)} run(s) have no summary.json (still running or interrupted), "
                f"left out of the curves: {', '.join(unfinished)}"
                + (f"; unreadable: {'; '.join(unreadable)}" if unreadable else ""),
            )
        self._accuracy(finished, len(runs))
        explicit_set = {p.resolve() for p in explicit}
        chosen = [r for r in runs if r.path.resolve() in explicit_set]
        covered = {(r.dataset, r.method, r.beta) for r in chosen}
        first_seed: dict[tuple[str, str, float], RunReader] = {}
        for run in sorted(runs, key=lambda r: r.seed):
            key = (run.dataset, run.method, run.beta)
            if key in covered or run.method not in LIVAR_WEIGHTED:
                continue
            first_seed.setdefault(key, run)
        chosen += list(first_seed.values())
        if not chosen:
            self.catalogue.skipped(
                "alpha",
                "Per-layer alpha heat maps",
                "no run given with --runs and no LIVAR-weighted "
                f"({', '.join(LIVAR_WEIGHTED)}) run in the sweeps",
            )
        for run in chosen:

            def alpha(run: RunReader = run) -> tuple[list[Path], str]:
                out = plot_alpha_heatmap(
                    run, self.figures / f"alpha-{run.name}", rounds=self.alpha_rounds
                )
                return out.files, f"rounds {out.data['rounds']}"

            _produce(
                self.catalogue,
                f"alpha-{run.name}",
                f"Alpha heat map ({run.name})",
                alpha,
                [run.path],
            )

    def _accuracy(self, finished: list[RunReader], total: int) -> None:
        if not finished:
            self.catalogue.skipped(
                "accuracy",
                "Accuracy curves",
                f"none of the {total} run folder(s) is finished (summary.json)",
            )
            return
        readable = []
        for run in finished:
            try:
                run.metrics  # noqa: B018 - read (and check) metrics.csv
            except ArtifactError as err:
                self.catalogue.skipped(f"accuracy-{run.name}", f"Accuracy of {run.name}", str(err))
            else:
                readable.append(run)
        if not readable:
            self.catalogue.skipped("accuracy", "Accuracy curves", "no readable metrics.csv")
            return
        curves = accuracy_curves(readable)
        self.tables_dir.mkdir(parents=True, exist_ok=True)
        curves.to_csv(self.tables_dir / "accuracy_curves.csv", index=False)
        for dataset in sorted(curves["dataset"].unique()):

            def producer(dataset: str = dataset) -> tuple[list[Path], str]:
                out = plot_accuracy_curves(curves, dataset, self.figures / f"accuracy-{dataset}")
                methods = ", ".join(method_name(m) for m in out.data["methods"])
                betas = ", ".join(format_beta(b) for b in out.data["betas"])
                return out.files, f"{methods}; β {betas}"

            _produce(
                self.catalogue,
                f"accuracy-{dataset}",
                f"Accuracy curves ({dataset_name(dataset)})",
                producer,
            )

    # ------------------------------------------------------------------ tables 1-4
    def result_tables(self) -> None:
        if not self.sweeps:
            for spec in self.specs.values():
                self.catalogue.skipped(spec.key, spec.label, "no sweep roots given (--sweeps)")
            return
        rows, problems = collect_sweeps(self.sweeps)
        for i, problem in enumerate(problems):
            self.catalogue.skipped(f"sweep-{i + 1}", "Sweep roots", problem)
        held = sorted({(r["dataset"], float(r["beta"])) for r in rows}, key=str)
        found = "; ".join(f"{dataset_name(d)} β={format_beta(b)}" for d, b in held) or "nothing"
        for spec in [*self.specs.values(), *found_specs(rows)]:

            def producer(spec: Any = spec) -> tuple[list[Path], str]:
                result = build_table(rows, spec)
                if result.missing == result.total:
                    raise ArtifactError(
                        f"no finished run for any of its cells ({describe(result)}); the sweeps "
                        f"hold: {found}"
                    )
                return write_table(result, self.tables_dir), describe(result)

            _produce(self.catalogue, spec.key, spec.label, producer, self.sweeps)
        for dataset in sorted({r["dataset"] for r in rows}):

            def beta_figure(dataset: str = dataset) -> tuple[list[Path], str]:
                path = self.figures / f"accuracy-vs-beta-{dataset}"
                out = plot_accuracy_vs_beta(rows, dataset, path)
                methods = ", ".join(method_name(m) for m in out.data["methods"])
                return out.files, f"{methods}; β {', '.join(map(format_beta, out.data['betas']))}"

            def costs(dataset: str = dataset) -> tuple[list[Path], str]:
                return write_costs(self.sweeps, dataset, self.tables_dir), "medians per method"

            def paired_figure(dataset: str = dataset) -> tuple[list[Path], str]:
                paired = [
                    r
                    for root in unique_paths([Path(p) for p in self.sweeps])
                    for r in collect_paired(root)
                ]
                if not any(r["dataset"] == dataset and r["paired"] == "fedavg" for r in paired):
                    raise ArtifactError(
                        f"no {dataset} sweep run has paired.csv rows against fedavg "
                        "(run the sweep with --paired fedavg)"
                    )
                path = self.figures / f"paired-vs-beta-{dataset}"
                out = plot_paired_vs_beta(paired, dataset, path)
                self.tables_dir.mkdir(parents=True, exist_ok=True)
                table = out.data["table"]
                table.to_csv(self.tables_dir / f"paired-{dataset}.csv", index=False)
                (self.tables_dir / f"paired-{dataset}.md").write_text(
                    paired_markdown(paired_table([r for r in paired if r["dataset"] == dataset]))
                    + "\n"
                )
                methods = ", ".join(method_name(m) for m in out.data["methods"])
                return [*out.files, self.tables_dir / f"paired-{dataset}.csv"], methods

            name = dataset_name(dataset)
            _produce(
                self.catalogue,
                f"accuracy-vs-beta-{dataset}",
                f"Accuracy against β ({name})",
                beta_figure,
                self.sweeps,
            )
            _produce(
                self.catalogue,
                f"paired-vs-beta-{dataset}",
                f"Paired differences to FedAvg against β ({name})",
                paired_figure,
                self.sweeps,
            )
            _produce(self.catalogue, f"costs-{dataset}", f"Costs ({name})", costs, self.sweeps)

    # ------------------------------------------------------------------ all
    def run(self, log: Callable[[str], None] | None = print) -> Catalogue:
        """Produce every item, write ``catalogue.json``, print one line per item."""
        self.out.mkdir(parents=True, exist_ok=True)
        _produce(
            self.catalogue,
            "figure2",
            "Figure 2",
            self.figure2,
            [self.calibration_path] if self.calibration_path else [],
        )
        _produce(
            self.catalogue,
            "figureA",
            "Figure A",
            self.figure_a,
            [self.calibration_path] if self.calibration_path else [],
        )
        self.aposteriori()
        self.table_figures()
        self.federated()
        self.result_tables()
        path = self.catalogue.write()
        if log is not None:
            for line in self.catalogue.lines():
                log(line)
            counts = {s: self.catalogue.count(s) for s in ("made", "skipped", "failed")}
            log(
                f"{counts['made']} made, {counts['skipped']} skipped, {counts['failed']} failed; "
                f"catalogue: {path}"
            )
        return self.catalogue


def regenerate(
    out: str | Path, *, log: Callable[[str], None] | None = print, **options: Any
) -> Catalogue:
    """Regenerate into ``out``; ``options`` as :class:`Regeneration`. Returns the catalogue."""
    return Regeneration(out, **options).run(log=log)
