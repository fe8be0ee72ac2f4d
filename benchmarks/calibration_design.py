"""Designs of the main job (``livar-calibrate`` on the embedded proxy) side by side.

Reads the ``summary.json`` and ``config.json`` of calibration run folders and prints, per design:
runs x rounds, training images, local epochs, image size, batch, the proxy training's image
passes and wall time with the machine's measured throughput beside it, the held-out R^2 (pooled
and the mean within-run R^2 with its t interval over held-out runs), the 4-fold cross-validated
R^2 by runs at the run's forest options and at ``min_samples_leaf=50``, the in-sample R^2 of a
forest fitted on every run (an upper bound on what the two quantile features explain of this
design's NNLS coefficients: no held-out R^2 can be expected above it) and the SHAP trends.
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


def cross_validated_r2(folder: Path, min_samples_leaf: int | None = None) -> dict[str, float]:
    """:func:`livar_calib.forest.cross_validated_r2` on the folder's rows with its options (folders
    calibrated before the pipeline recorded it are scored here the same way)."""
    import pandas as pd

    from livar_calib.forest import cross_validated_r2 as score

    return score(pd.read_csv(folder / "rows.csv"), forest_settings(folder, min_samples_leaf))


def forest_settings(folder: Path, min_samples_leaf: int | None = None) -> Any:
    """The :class:`~livar_calib.forest.ForestSettings` a calibration folder recorded."""
    from livar_calib.forest import ForestSettings

    config = json.loads((folder / "config.json").read_text())["config"]
    leaf = min_samples_leaf or config["min_samples_leaf"]
    return ForestSettings(config["seed"], config["n_estimators"], leaf)


def ceiling_r2(folder: Path) -> float:
    """R^2 on its own rows of a forest fitted on every run of the folder (its forest options)."""
    import pandas as pd

    from livar_calib.forest import DEFAULT_FEATURES

    rows = pd.read_csv(folder / "rows.csv")
    x, y = rows.loc[:, list(DEFAULT_FEATURES)], rows["lam"]
    model = forest_settings(folder).regressor()
    return float(model.fit(x, y).score(x, y))


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
        "image_passes": 2
        * (config["max_train"] or 0)
        * config["local_epochs"]
        * runs
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
        "cv_r2_leaf50": cross_validated_r2(folder, min_samples_leaf=50)["cv_r2"],
        "in_sample_r2": ceiling_r2(folder),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| design | runs x rounds | images | epochs | px | batch | image passes | proxy s "
        "(img/s) | GFLOP/s | held-out runs | R^2 | within-run R^2 [95% t] | 4-fold CV R^2 | CV "
        "within-run R^2 [95% t] | CV R^2, leaf 50 | in-sample R^2 (ceiling) | SHAP q_a, q_b |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{r['cv_r2_leaf50']:.3f} | {r['in_sample_r2']:.3f} | "
            f"{trend['q_a']:+.2f}, {trend['q_b']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    rows = [design_row(Path(arg)) for arg in sys.argv[1:]]
    save("calibration_design", {"designs": rows}, markdown(rows))


if __name__ == "__main__":
    main()
