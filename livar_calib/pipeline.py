"""The calibration pipeline, stage by stage, with every stage cached in the run folder.

    1 proxy training   proxy/<b-s>/round_<r>.{safetensors,csv}          (resumable per round)
    2 NNLS (Eq. 4)      rows.csv: omega_A, omega_B, n, lambda, q_A, q_B per (repeat, client, layer)
    3 random forest     forest.skops (+ forest_samples.skops with the sample count), forest.json
    4 SHAP              shap_values.csv (+ shap_values_samples.csv), shap.json (base values)
    5 discretisation    table/<name>.v<N>.json (Appendix A)
    6 quality report    quality.csv, quality_summary.csv: reconstruction error of the joint delta
    figures             figures/figure2.{png,pdf}, figures/figureA.{png,pdf}

Stages 2-6 are deterministic functions of stage 1 and the seed, so ``--resume`` after an
interruption at any point produces the same table. They are cached: ``stages.json``
(:class:`~livar_calib.stages.StageLedger`) records each stage's inputs (options, and the
checksums of the files it reads) and the checksums of the files it wrote, and a resumed run
skips a stage whose inputs and outputs are unchanged and loads its outputs instead; the
discretisation reuses a table version written with the same options. The figures are redrawn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import torch

from livar_calib.config import ANALYSIS_OPTIONS, CalibConfig, training_hash
from livar_calib.deltas import load_repeat
from livar_calib.discretise import EdgeSpec, build_table
from livar_calib.downstream import downstream_report, summarise_downstream
from livar_calib.explain import ShapResult, shap_analysis
from livar_calib.features import add_quantile_features
from livar_calib.figures import plot_shap_summary
from livar_calib.forest import (
    DEFAULT_FEATURES,
    WITH_SAMPLES,
    ForestResult,
    ForestSettings,
    cross_validated_r2,
    fit_forest,
)
from livar_calib.intervals import (
    MIN_HELDOUT_RUNS,
    TOO_FEW,
    UNIT,
    interval_text,
    run_of,
    split_runs,
)
from livar_calib.nnls import nnls_repeat
from livar_calib.proxy import completed_rounds, proxy_runs, run_proxy_training
from livar_calib.quality import reconstruction_report, summarise_report, verdict
from livar_calib.stages import StageLedger
from livar_merge._io import atomic_write, read_json_object, write_csv, write_json
from livar_merge.engines.ray_engine import EngineOptions
from livar_merge.errors import CalibrationError, MissingHeadsError, RunFolderError, TableError
from livar_merge.federated import pretrained
from livar_merge.federated.datasets import load_dataset
from livar_merge.federated.machine import describe, machine_record
from livar_merge.federated.results import provenance
from livar_merge.tables import GShapTable, existing_versions, table_file_name


class _ForestOptions(TypedDict):
    """The options both forests are fitted with (``options`` of ``forest.json``)."""

    seed: int
    n_estimators: int
    min_samples_leaf: int
    holdout_repeats: list[str]
    n_jobs: int


class _EdgeOptions(TypedDict, total=False):
    """``build_table``'s edge rules when they are not the paper's."""

    edges_a: EdgeSpec
    edges_b: EdgeSpec


def collect_rows(config: CalibConfig, root: Path) -> Any:  # -> pandas.DataFrame
    """Stage 2: rows of every repeat with their NNLS lambda and quantile features."""

    frames = []
    for run in proxy_runs(config):
        folder = root / "proxy" / run.run_id
        for r in range(1, config.rounds + 1):
            rows = pd.read_csv(folder / f"round_{r}.csv")
            lam = nnls_repeat(load_repeat(folder / f"round_{r}.safetensors"))
            frames.append(
                rows.merge(
                    lam, on=["repeat_id", "client", "layer"], how="left", validate="one_to_one"
                )
            )
    rows = pd.concat(frames, ignore_index=True)
    missing = rows[rows["lam"].isna()]
    if len(missing):
        first = missing.iloc[0]
        raise CalibrationError(
            f"NNLS produced no lambda for {len(missing)} rows of repeat(s) "
            f"{sorted(missing['repeat_id'].astype(str).unique())} (mismatched client/layer ids), "
            f"e.g. client {first['client']!r}, layer {first['layer']!r}"
        )
    return add_quantile_features(rows)


def load_repeats(config: CalibConfig, root: Path, repeat_ids: list[str]) -> list[Any]:

    wanted = set(repeat_ids)
    out = []
    for run in proxy_runs(config):
        for r in range(1, config.rounds + 1):
            if run.repeat_id(r) in wanted:
                out.append(load_repeat(root / "proxy" / run.run_id / f"round_{r}.safetensors"))
    return out


def _save_forest(result: Any, path: Path) -> None:
    import skops.io as sio

    atomic_write(path, lambda tmp: sio.dump(result.model, tmp))


def _save_array(path: Path, array: np.ndarray) -> None:
    """``array`` as ``.npy`` (no pickle), atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


# the only types a forest file may hold beyond skops' defaults (anything else is refused)
FOREST_TYPES = ["sklearn.tree._tree.Tree"]


def _load_forest(path: Path) -> Any:
    """A forest written by :func:`_save_forest` (skops, never pickle: :data:`FOREST_TYPES`)."""
    import skops.io as sio

    return sio.load(path, trusted=FOREST_TYPES)


def preflight(config: CalibConfig) -> None:
    """Find the proxy data and the weights (without resizing or training) so that a bad
    dataset, data root or weights source fails before the run folder is touched."""

    load_dataset(config.proxy, config.data_root, image_size=None, seed=config.seeds[0])
    if pretrained.is_source_name(config.weights):
        overrides = config.architecture_overrides()
        pretrained.check_compatible(config.weights, config.model, list(overrides))
        pretrained.cached_weights(config.weights)


def run_calibration(
    config: CalibConfig,
    root: Path,
    *,
    publish_dir: Path | None = None,
    log: Any = print,
    engine: EngineOptions | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary written to ``summary.json``. ``engine``
    runs the proxy training's (beta, seed) runs serially (default) or as Ray tasks; the
    results are the same either way. Stages 2-6 whose recorded inputs are unchanged are
    skipped (:class:`~livar_calib.stages.StageLedger`)."""

    root.mkdir(parents=True, exist_ok=True)
    _check_config(config, root, log)
    ledger = StageLedger(root)
    timings: dict[str, float] = {}
    weights_record = weights_provenance(config.weights)  # hashes the cached file once

    before = completed_rounds(config, root)
    start = time.perf_counter()
    run_proxy_training(config, root, engine)
    timings["proxy_training"] = time.perf_counter() - start
    machine = machine_throughput(config, timings["proxy_training"], before, root)
    log(f"machine: {describe(machine)}" + _training_rate(machine))

    start = time.perf_counter()
    cal = Calibration(config, root, ledger)
    rows = _nnls_stage(cal)
    timings["nnls"] = time.perf_counter() - start
    log(
        f"NNLS: {rows['repeat_id'].nunique()} repeats, {len(rows)} rows; "
        f"median relative residual {rows['relative_residual'].median():.3f}"
    )

    start = time.perf_counter()
    split = split_runs(
        rows["repeat_id"], holdout_fraction=config.holdout_fraction, seed=config.seed
    )
    train_ids, test_ids, test_runs = split
    scored_ids, scope = (test_ids, "held-out") if test_ids else (train_ids, "in-sample")
    forest, forest_samples, forests = _forest_stage(cal, rows, split)
    timings["forest"] = time.perf_counter() - start
    log(_forest_line(forest.metrics, len(test_runs)))

    start = time.perf_counter()
    explained, explained_samples, shap_info = _shap_stage(cal, rows, forest, forest_samples)
    timings["shap"] = time.perf_counter() - start
    log(
        "SHAP trend (Spearman rank correlation of each feature with its SHAP value): "
        + ", ".join(f"{k} {v:+.2f}" for k, v in shap_info["trend_spearman"].items())
    )

    start = time.perf_counter()
    name = config.table_name or config.default_table_name()
    table_dir = root / "table"
    edges: _EdgeOptions = (
        {} if config.edges == "paper" else {"edges_a": "shap-curve", "edges_b": "shap-curve"}
    )
    prov = {
        "proxy_dataset": config.proxy,
        "backbone": config.model,
        "weights": config.weights,
        "weights_provenance": weights_record,
        "config_hash": config.config_hash(),
        "calibration_config": config.to_dict(),
        "rows": len(rows),
        "repeats": int(rows["repeat_id"].nunique()),
        "forest_metrics": forest.metrics,
    }
    table, table_path = _table_for(config, explained, rows, name, table_dir, prov, edges)
    published = None
    if publish_dir is not None:
        published = _publish(table, publish_dir)
    timings["discretisation"] = time.perf_counter() - start
    log(repr(table))

    start = time.perf_counter()
    tables = {"calibrated": table, "paper-table-a": GShapTable.load("paper-table-a")}
    report = _quality_stage(cal, rows, scored_ids, tables)
    summary_report = summarise_report(report)
    write_csv(root / "quality_summary.csv", summary_report, index=True)
    timings["quality"] = time.perf_counter() - start
    quality_verdict = _scoped(verdict(report, "calibrated", ["paper-table-a"]), scope)
    log(
        f"reconstruction error of the joint delta on {scope} repeats (raw; scaled: after the "
        "best per-layer scale; gap_closed: share of the FedAvg-to-oracle gap in scaled error):\n"
        + summary_report.to_string()
        + "\n"
        + quality_verdict
    )

    downstream_summary = None
    if config.downstream:
        start = time.perf_counter()
        downstream_summary = _downstream(cal, rows, scored_ids, tables, log, scope)
        timings["downstream"] = time.perf_counter() - start

    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    plot_shap_summary(explained, rows, figures / "figure2")
    if explained_samples is not None:
        plot_shap_summary(explained_samples, rows, figures / "figureA")
    reused = sorted(s for s, how in ledger.outcome.items() if how == "reused")
    if reused:
        log(f"stages whose recorded inputs were unchanged, skipped: {', '.join(reused)}")

    summary = {
        "table": str(table_path),
        "published": None if published is None else str(published),
        "table_identity": table.identity(),
        "rows": len(rows),
        "repeats": int(rows["repeat_id"].nunique()),
        "resampling_unit": UNIT,
        "evaluation": scope,
        "held_out_runs": test_runs,
        "held_out_repeats": test_ids,
        "min_held_out_runs_for_an_interval": MIN_HELDOUT_RUNS,
        "forest_metrics": forests,
        "shap_trend_spearman": shap_info["trend_spearman"],
        "quality_summary": json.loads(summary_report.to_json(orient="index")),
        "quality_verdict": quality_verdict,
        "downstream": downstream_summary,
        "stages": dict(ledger.outcome),
        "timings_seconds": timings,
        "machine": machine,
    }
    write_json(root / "summary.json", summary)
    _track(config, root, summary, table, table_path, quality_verdict)
    write_json(
        root / "provenance.json",
        provenance(
            {
                "seed": config.seed,
                "config_hash": config.config_hash(),
                "table": table.identity(),
                "weights": config.weights,
                "weights_provenance": weights_record,
            }
        ),
    )
    return summary


def _track(
    config: CalibConfig,
    root: Path,
    summary: dict[str, Any],
    table: GShapTable,
    table_path: Path,
    quality_verdict: str,
) -> None:
    """Mirror the finished calibration in the trackers of ``--track`` (continued on resume)."""
    if not config.track:
        return
    from livar_merge.tracking import Trackers

    trackers = Trackers(
        root,
        config.track,
        title=f"calibration {root.name}",
        params={k: v for k, v in config.to_dict().items() if k != "track"},
        resume=True,
    )
    figures = sorted((root / "figures").glob("*.png"))
    files = [table_path, root / "summary.json", root / "quality_summary.csv", *figures]
    trackers.log_calibration(
        summary, {"table": repr(table), "quality_verdict": quality_verdict}, files
    )


# ------------------------------------------------------------------------------ stages 2-6
@dataclass(frozen=True)
class Calibration:
    """What every analysis stage reads: the options, the folder and its stage ledger."""

    config: CalibConfig
    root: Path
    ledger: StageLedger


def _nnls_stage(cal: Calibration) -> pd.DataFrame:
    """Stage 2 (rows.csv), from the proxy runs of this training (stage 1's options)."""
    config, root, ledger = cal.config, cal.root, cal.ledger
    inputs = {
        "training": training_hash(config.to_dict()),
        "runs": [run.run_id for run in proxy_runs(config)],
        "rounds": config.rounds,
    }

    def compute() -> pd.DataFrame:
        rows = collect_rows(config, root)
        write_csv(root / "rows.csv", rows)
        return rows

    return ledger.run("nnls", inputs, ["rows.csv"], compute, lambda: pd.read_csv(root / "rows.csv"))


def _forest_stage(
    cal: Calibration,
    rows: pd.DataFrame,
    split: tuple[list[str], list[str], list[str]],
) -> tuple[ForestResult, ForestResult | None, dict[str, Any]]:
    """Stage 3: the forest (and the one with the sample count), its metrics in forest.json."""
    config, root, ledger = cal.config, cal.root, cal.ledger
    train_ids, test_ids, test_runs = split
    settings = ForestSettings(config.seed, config.n_estimators, config.min_samples_leaf, n_jobs=2)
    forest_options: _ForestOptions = {
        "seed": config.seed,
        "n_estimators": config.n_estimators,
        "min_samples_leaf": config.min_samples_leaf,
        "holdout_repeats": test_ids,
        "n_jobs": 2,
    }
    files = ["forest.skops", "forest.json"] + (
        ["forest_samples.skops"] if config.sample_feature else []
    )
    inputs = {"rows": ledger.checksum("rows.csv"), "options": forest_options, "files": files}

    def compute() -> tuple[ForestResult, ForestResult | None, dict[str, Any]]:
        forest = fit_forest(rows, settings, holdout_repeats=test_ids)
        _save_forest(forest, root / "forest.skops")
        forest.metrics.update(cross_validated_r2(rows, settings))
        forests = {"q_a,q_b": forest.metrics}
        forest_samples = None
        if config.sample_feature:
            forest_samples = fit_forest(
                rows, settings, features=WITH_SAMPLES, holdout_repeats=test_ids
            )
            _save_forest(forest_samples, root / "forest_samples.skops")
            forests["q_a,q_b,num_samples"] = forest_samples.metrics
        record = {
            "resampling_unit": UNIT,
            "train_repeats": train_ids,
            "test_repeats": test_ids,
            "test_runs": test_runs,
            "metrics": forests,
            "options": forest_options,
        }
        write_json(root / "forest.json", record)
        return forest, forest_samples, forests

    def load() -> tuple[ForestResult, ForestResult | None, dict[str, Any]]:
        forests = read_json_object(root / "forest.json")["metrics"]

        def result(file: str, features: tuple[str, ...], key: str) -> ForestResult:
            model = _load_forest(root / file)
            return ForestResult(model, features, "lam", train_ids, test_ids, forests[key])

        forest = result("forest.skops", DEFAULT_FEATURES, "q_a,q_b")
        samples = None
        if config.sample_feature:
            samples = result("forest_samples.skops", WITH_SAMPLES, "q_a,q_b,num_samples")
        return forest, samples, forests

    return ledger.run("forest", inputs, files, compute, load)


def _shap_stage(
    cal: Calibration,
    rows: pd.DataFrame,
    forest: ForestResult,
    forest_samples: ForestResult | None,
) -> tuple[ShapResult, ShapResult | None, dict[str, Any]]:
    """Stage 4: SHAP values (and interactions for the ``interaction`` rule), shap.json."""
    config, root, ledger = cal.config, cal.root, cal.ledger
    interactions = config.discretise == "interaction"
    files = ["shap_values.csv", "shap.json"]
    files += ["shap_values_samples.csv"] if forest_samples is not None else []
    files += ["shap_interactions.npy"] if interactions else []
    inputs = {
        "rows": ledger.checksum("rows.csv"),
        "forest": ledger.inputs_of("forest"),  # the forest files are not byte-reproducible
        "files": files,
    }

    def compute() -> tuple[ShapResult, ShapResult | None, dict[str, Any]]:
        data = rows.loc[:, list(forest.features)]
        explained = shap_analysis(forest, data, interactions=interactions)
        write_csv(root / "shap_values.csv", explained.values)
        if explained.interactions is not None:
            _save_array(root / "shap_interactions.npy", explained.interactions)
        shap_info: dict[str, Any] = {
            "base_value": explained.base_value,
            "features": list(explained.feature_names),
        }
        explained_samples = None
        if forest_samples is not None:
            explained_samples = shap_analysis(forest_samples, rows.loc[:, list(WITH_SAMPLES)])
            write_csv(root / "shap_values_samples.csv", explained_samples.values)
            shap_info["base_value_samples"] = explained_samples.base_value
            shap_info["mean_abs_shap_samples"] = {
                k: float(v) for k, v in explained_samples.values.abs().mean().items()
            }
        shap_info["trend_spearman"] = shap_trends(explained)
        write_json(root / "shap.json", shap_info)
        return explained, explained_samples, shap_info

    def load() -> tuple[ShapResult, ShapResult | None, dict[str, Any]]:
        shap_info = read_json_object(root / "shap.json")
        pairs = None
        if interactions:
            pairs = np.load(root / "shap_interactions.npy", allow_pickle=False)
        explained = ShapResult(
            pd.read_csv(root / "shap_values.csv"),
            float(shap_info["base_value"]),
            forest.features,
            rows.loc[:, list(forest.features)],
            pairs,
        )
        explained_samples = None
        if forest_samples is not None:
            explained_samples = ShapResult(
                pd.read_csv(root / "shap_values_samples.csv"),
                float(shap_info["base_value_samples"]),
                WITH_SAMPLES,
                rows.loc[:, list(WITH_SAMPLES)],
            )
        return explained, explained_samples, shap_info

    return ledger.run("shap", inputs, files, compute, load)


def _quality_stage(
    cal: Calibration,
    rows: pd.DataFrame,
    scored_ids: list[str],
    tables: dict[str, GShapTable],
) -> pd.DataFrame:
    """Stage 6: the reconstruction error of the joint delta per scored repeat (quality.csv)."""
    config, root, ledger = cal.config, cal.root, cal.ledger
    inputs = {
        "rows": ledger.checksum("rows.csv"),
        "scored": scored_ids,
        "tables": {name: table.identity() for name, table in tables.items()},
    }

    def compute() -> pd.DataFrame:
        report = reconstruction_report(load_repeats(config, root, scored_ids), rows, tables)
        write_csv(root / "quality.csv", report)
        return report

    return ledger.run(
        "quality", inputs, ["quality.csv"], compute, lambda: pd.read_csv(root / "quality.csv")
    )


def machine_throughput(
    config: CalibConfig, seconds: float, rounds_before: int, root: Path
) -> dict[str, Any]:
    """:func:`livar_merge.federated.machine.machine_record` for this calibration's backbone at
    its image size (a probe on a seeded copy), plus the proxy training's own rate: the image
    passes of the rounds trained in this invocation (``2 x training images x local epochs`` a
    round: the M clients' partition and the joint model) over its wall time."""
    from livar_merge.federated.federation import build_seeded_model, resolve_device

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, _ = build_seeded_model(config, 10, seed=0)
    record = machine_record(model, image_size=config.image_size, device=device)
    trained = completed_rounds(config, root) - rounds_before
    if trained > 0:
        partition = pd.read_csv(root / "proxy" / proxy_runs(config)[0].run_id / "partition.csv")
        images = int(partition["total"].sum())  # the union: every client's samples once
        passes = trained * 2 * images * config.local_epochs
        record["proxy_training"] = {
            "rounds": trained,
            "image_passes": passes,
            "seconds": round(seconds, 2),
            "images_per_second": round(passes / seconds, 2),
        }
    return record


def _training_rate(machine: dict[str, Any]) -> str:
    proxy = machine.get("proxy_training")
    if not proxy:
        return ""
    return (
        f"; proxy training {proxy['image_passes']} image passes in {proxy['seconds']:.0f} s "
        f"({proxy['images_per_second']} images/s)"
    )


def weights_provenance(weights: str) -> dict[str, Any] | None:
    """Source, checksums and licence of a named weight source (None for other weights)."""

    if not pretrained.is_source_name(weights):
        return None
    return pretrained.cached_weights(weights)[1]


def shap_trends(explained: Any) -> dict[str, float]:
    """Per feature: Spearman's rho between the feature's value and its SHAP value (positive: a
    larger feature raises lambda)."""
    from scipy.stats import spearmanr

    out = {}
    for feature in explained.feature_names:
        rho = spearmanr(explained.data[feature].to_numpy(), explained.values[feature].to_numpy())[0]
        out[feature] = float(rho) if rho == rho else 0.0
    return out


def _check_config(config: CalibConfig, root: Path, log: Any = print) -> None:
    """Refuse a folder whose proxy training used other options; a resumed calibration may
    change the analysis options (``ANALYSIS_OPTIONS``): config.json then records the new
    config and the earlier ones under ``previous``."""
    path = root / "config.json"
    current = config.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        if training_hash(saved["config"]) != config.training_hash():
            diff = {
                k: (saved["config"].get(k), v)
                for k, v in current.items()
                if saved["config"].get(k) != v
                and k not in ANALYSIS_OPTIONS | {"progress", "threads", "track"}
            }
            raise RunFolderError(
                f"{root} holds a calibration with another configuration: {diff}; "
                "choose another --out"
            )
        if saved["config_hash"] == config.config_hash():
            return
        changed = {
            k: (saved["config"].get(k), v)
            for k, v in current.items()
            if k in ANALYSIS_OPTIONS and saved["config"].get(k) != v
        }
        log(f"resuming with other analysis options {changed}: the analysis runs again")
        previous = [*saved.get("previous", []), {k: saved[k] for k in ("config", "config_hash")}]
        write_json(
            path, {"config": current, "config_hash": config.config_hash(), "previous": previous}
        )
        return
    write_json(path, {"config": current, "config_hash": config.config_hash()})


def _downstream(
    cal: Calibration,
    rows: Any,
    repeat_ids: list[str],
    tables: dict[str, GShapTable],
    log: Any,
    scope: str = "held-out",
) -> dict[str, Any] | None:
    """The downstream check (:mod:`livar_calib.downstream`): ``downstream.csv`` (a ledger
    stage: its inputs are every option, the rows, the scored repeats and the tables),
    ``downstream_summary.csv`` and the summary's entry; None when the proxy training saved
    no heads (a calibration from before the check)."""
    config, root, ledger = cal.config, cal.root, cal.ledger
    inputs = {
        "config": config.config_hash(),
        "rows": ledger.checksum("rows.csv"),
        "scored": repeat_ids,
        "tables": {name: table.identity() for name, table in tables.items()},
    }

    def compute() -> pd.DataFrame:
        frame = downstream_report(config, root, rows, repeat_ids, tables, log=log)
        write_csv(root / "downstream.csv", frame)
        return frame

    try:
        frame = ledger.run(
            "downstream",
            inputs,
            ["downstream.csv"],
            compute,
            lambda: pd.read_csv(root / "downstream.csv"),
        )
    except MissingHeadsError as err:
        log(f"downstream check skipped: {err}")
        return None
    summary = summarise_downstream(frame)
    write_csv(root / "downstream_summary.csv", summary, index=True)
    table = summary.loc["calibrated"]
    interval = interval_text(
        table["diff_low"], table["diff_high"], int(table["runs"]), scale="{:+.4f}"
    )
    sentence = _scoped(
        f"downstream on {int(table['repeats'])} {scope} repeats of {int(table['runs'])} runs "
        f"(same client updates, FedAvg head, {config.max_test or 'all'} test images): "
        f"calibrated table top-1 {table['test_accuracy']:.4f}, "
        f"{table['difference']:+.4f} vs FedAvg{interval}; paper-table-a "
        f"{summary.loc['paper-table-a', 'difference']:+.4f}; joint model "
        f"{summary.loc['joint', 'difference']:+.4f}",
        scope,
    )
    log("downstream accuracy of the merged models:\n" + summary.to_string() + "\n" + sentence)
    return {"summary": json.loads(summary.to_json(orient="index")), "verdict": sentence}


def _forest_line(metrics: dict[str, float], held_out_runs: int) -> str:
    """The forest's held-out and cross-validated R^2 in one line of the log."""
    held_out = interval_text(metrics["r2_by_run_low"], metrics["r2_by_run_high"], held_out_runs)
    cross = interval_text(
        metrics["cv_r2_by_run_low"],
        metrics["cv_r2_by_run_high"],
        int(metrics.get("cv_runs", 0)),
        unit="runs",
    )
    return (
        f"forest: held-out R2 {metrics['r2']:.3f} on {held_out_runs} held-out runs (constant "
        f"predictor {metrics['r2_constant']:.3f}), MAE {metrics['mae']:.4f}; within-run R2 "
        f"{metrics['r2_by_run']:.3f}{held_out}; {metrics.get('cv_folds', 0):.0f}-fold "
        f"cross-validated by runs: R2 {metrics['cv_r2']:.3f}, within-run "
        f"{metrics['cv_r2_by_run']:.3f}{cross}"
    )


def _scoped(text: str, scope: str) -> str:
    """``text``, prefixed with a warning when the repeats scored were the training repeats
    (a calibration with a single run has no held-out run)."""
    if scope == "held-out":
        return text
    return f"in-sample (no held-out runs; {TOO_FEW}): {text}"


def _table_for(
    config: CalibConfig,
    explained: Any,
    rows: Any,
    name: str,
    table_dir: Path,
    prov: dict[str, Any],
    edges: _EdgeOptions,
) -> tuple[GShapTable, Path]:
    """The run's table: an existing version written with this config (a resumed run reuses
    it, never rewrites it), else the next version."""
    for existing in sorted(table_dir.glob(f"{name}.v*.json"), reverse=True):
        table = GShapTable.load(existing)
        if table.provenance.get("config_hash") == config.config_hash():
            return table, existing
    return build_table(
        explained,
        rows,
        name=name,
        out_dir=table_dir,
        provenance=prov,
        rule=config.discretise,
        min_cell_rows=config.min_cell_rows,
        runs=[run_of(r) for r in rows["repeat_id"]],
        resamples=config.cell_resamples,
        seed=config.seed,
        **edges,
    )


def _publish(table: Any, directory: Path) -> Path:
    """Copy the table into ``directory`` under the next free version; never overwrite."""

    directory.mkdir(parents=True, exist_ok=True)
    for existing in sorted(directory.glob(f"{table.name}.v*.json")):
        other = GShapTable.load(existing)
        if np.array_equal(other.values, table.values) and other.provenance.get(
            "config_hash"
        ) == table.provenance.get("config_hash"):
            return existing  # the same table is already published
    version = 1 + max(existing_versions(directory, table.name), default=0)
    target = directory / table_file_name(table.name, version)
    if target.exists():
        raise TableError(f"{target} exists")
    return replace(table, version=version, source_path=None).save(target)
