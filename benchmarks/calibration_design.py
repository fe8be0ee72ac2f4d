"""Designs of the main job (``livar-calibrate`` on the embedded proxy) side by side.

Reads the ``summary.json`` and ``config.json`` of calibration run folders and prints, per design:
runs x rounds, training images, local epochs, image size, batch, the proxy training's image
passes and wall time with the machine's measured throughput beside it, the held-out R^2 (pooled
and the mean within-run R^2 with its t interval over held-out runs) and the SHAP trends.
Results go to ``benchmarks/results/calibration_design.{json,md}``.

    python benchmarks/calibration_design.py runs/design/d1 runs/design/d4 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save


def cross_validated_r2(folder: Path, folds: int = 4, seed: int = 0) -> dict[str, float]:
    """R^2 of the calibration forest (the run's options) on every run, each predicted by a
    forest fitted on the other folds of whole runs (GroupKFold over runs): a steadier design
    comparison than one split of 3 held-out runs. Pooled R^2 over all rows, and the mean
    within-run R^2 with its t interval over runs."""
    import numpy as np
    import pandas as pd
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    from livar_calib.intervals import run_of, t_interval

    config = json.loads((folder / "config.json").read_text())["config"]
    rows = pd.read_csv(folder / "rows.csv")
    runs = rows["repeat_id"].map(run_of).to_numpy()
    x, y = rows[["q_a", "q_b"]].to_numpy(), rows["lam"].to_numpy()
    pred = np.empty_like(y)
    for train, test in GroupKFold(n_splits=folds).split(x, y, runs):
        forest = RandomForestRegressor(
            n_estimators=config["n_estimators"],
            min_samples_leaf=config["min_samples_leaf"],
            random_state=seed,
            n_jobs=2,
        ).fit(x[train], y[train])
        pred[test] = forest.predict(x[test])
    per_run = np.array([r2_score(y[runs == r], pred[runs == r]) for r in sorted(set(runs))])
    mean, low, high = t_interval(per_run)
    return {
        "cv_r2": float(r2_score(y, pred)),
        "cv_r2_by_run": float(mean[0]),
        "cv_r2_by_run_low": float(low[0]),
        "cv_r2_by_run_high": float(high[0]),
    }


def design_row(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())["config"]
    forest = summary["forest_metrics"]["q_a,q_b"]
    machine = summary.get("machine", {})
    proxy = machine.get("proxy_training", {})
    runs = len(config["betas"]) * len(config["seeds"])
    return {
        "design": folder.name,
        "runs": runs,
        "rounds": config["rounds"],
        "betas": config["betas"],
        "train_images": config["max_train"],
        "local_epochs": config["local_epochs"],
        "image_size": config["image_size"],
        "batch_size": config["batch_size"],
        "image_passes": 2 * (config["max_train"] or 0) * config["local_epochs"] * runs
        * config["rounds"],
        "proxy_seconds": proxy.get("seconds"),
        "proxy_images_per_second": proxy.get("images_per_second"),
        "gflops_fp32": machine.get("gflops_fp32"),
        "probe_images_per_second": machine.get("train_images_per_second"),
        "held_out_runs": len(summary.get("held_out_runs", [])),
        "r2": forest["r2"],
        "r2_by_run": forest.get("r2_by_run"),
        "r2_by_run_low": forest.get("r2_by_run_low"),
        "r2_by_run_high": forest.get("r2_by_run_high"),
        "shap_trend": summary["shap_trend_spearman"],
        "quality_verdict": summary["quality_verdict"],
        **cross_validated_r2(folder),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| design | runs x rounds | images | epochs | px | batch | image passes | proxy s "
        "(img/s) | GFLOP/s | held-out runs | R^2 | within-run R^2 [95% t] | 4-fold CV R^2 | CV "
        "within-run R^2 [95% t] | SHAP q_a, q_b |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = (
            f"{r['r2_by_run']:.3f} [{r['r2_by_run_low']:.3f}, {r['r2_by_run_high']:.3f}]"
            if r["r2_by_run"] is not None
            else "-"
        )
        seconds = (
            f"{r['proxy_seconds']:.0f} ({r['proxy_images_per_second']})"
            if r["proxy_seconds"]
            else "-"
        )
        trend = r["shap_trend"]
        lines.append(
            f"| {r['design']} | {r['runs']} x {r['rounds']} | {r['train_images']} | "
            f"{r['local_epochs']} | {r['image_size']} | {r['batch_size']} | {r['image_passes']:,} "
            f"| {seconds} | {r['gflops_fp32']} | {r['held_out_runs']} | {r['r2']:.3f} | "
            f"{interval} | {r['cv_r2']:.3f} | {r['cv_r2_by_run']:.3f} "
            f"[{r['cv_r2_by_run_low']:.3f}, {r['cv_r2_by_run_high']:.3f}] | "
            f"{trend['q_a']:+.2f}, {trend['q_b']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    rows = [design_row(Path(arg)) for arg in sys.argv[1:]]
    save("calibration_design", {"designs": rows}, markdown(rows))


if __name__ == "__main__":
    main()
