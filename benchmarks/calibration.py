"""Calibration cost stage by stage on the embedded default, and SHAP time against rows.

Runs ``livar-calibrate`` (embedded default proxy) into a fresh folder and reports the stage
timings it records (proxy training, NNLS, forest, SHAP, discretisation, quality report); then
times exact ``shap.TreeExplainer`` on forests of the default settings (200 trees,
min_samples_leaf 20) fitted on 500 to 8,000 synthetic rows.

    python benchmarks/calibration.py [--skip-pipeline]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save


def shap_scaling(rows_list: list[int]) -> list[dict]:
    import pandas as pd

    from livar_calib.explain import shap_analysis
    from livar_calib.forest import ForestSettings, fit_forest

    rng = np.random.default_rng(0)
    out = []
    for n in rows_list:
        q_a, q_b = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
        frame = pd.DataFrame(
            {
                "repeat_id": [f"r{i % 20}" for i in range(n)],
                "q_a": q_a,
                "q_b": q_b,
                "lam": 0.1 + 0.002 * q_b - 0.001 * q_a + rng.normal(0, 0.02, n),
            }
        )
        forest = fit_forest(frame, ForestSettings(n_jobs=2), holdout_repeats=[])
        start = time.perf_counter()
        shap_analysis(forest, frame.loc[:, ["q_a", "q_b"]])
        seconds = time.perf_counter() - start
        start = time.perf_counter()  # --discretise interaction: values and interaction values
        shap_analysis(forest, frame.loc[:, ["q_a", "q_b"]], interactions=True)
        both = time.perf_counter() - start
        out.append({"rows": n, "shap_seconds": seconds, "shap_interaction_seconds": both})
        print(
            f"SHAP on {n} rows: {seconds:.2f} s (with interactions {both:.2f} s)", file=sys.stderr
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    args = parser.parse_args()
    result: dict = {"benchmark": "calibration", "machine": machine()}
    lines = []
    if not args.skip_pipeline:
        from livar_calib.cli import main as calibrate

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            code = calibrate(["--out", str(Path(tmp) / "run"), "--no-progress"])
            wall = time.perf_counter() - start
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        if code != 0:
            raise SystemExit("livar-calibrate failed")
        timings = summary["timings_seconds"]
        result.update(
            pipeline_wall_seconds=wall,
            stage_seconds=timings,
            rows=summary["rows"],
            repeats=summary["repeats"],
        )
        lines += [
            f"Embedded default: {summary['repeats']} repeats, {summary['rows']} rows, "
            f"wall {wall:.0f} s",
            "",
            "| stage | seconds |",
            "|---|---|",
        ]
        lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in timings.items()]
        lines.append("")
    scaling = shap_scaling(args.rows)
    result["shap_scaling"] = scaling
    lines += [
        "| forest rows (200 trees, min_samples_leaf 20) | exact SHAP seconds "
        "| SHAP + interaction values seconds (`--discretise interaction`) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['rows']} | {row['shap_seconds']:.2f} | {row['shap_interaction_seconds']:.2f} |"
        for row in scaling
    ]
    save("calibration", result, "\n".join(lines))


if __name__ == "__main__":
    main()
