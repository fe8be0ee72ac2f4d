"""livar-sweep end to end: the grid runner on both engines, its tables."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pandas as pd
import pytest

from livar_merge.apps.sweep import (
    main,
)
from tests.helpers import cost_label as label
from tests.helpers import tiny_sweep_args


def test_sweep_runs_the_grid_skips_finished_runs_and_writes_tables(tmp_path: Path):
    extra = ("ccvr_samples=32", "ccvr_epochs=1")
    args = ["--root", str(tmp_path), *tiny_sweep_args("fedavg", "ccvr", extra=extra)]
    assert main(args) == 0
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == [
        "synthetic-ccvr-b0.5-s0",
        "synthetic-fedavg-b0.5-s0",
    ]
    stamps = [os.stat(p).st_mtime_ns for p in summaries]
    cells = pd.read_csv(tmp_path / "table.csv", index_col=0)
    assert cells.loc["fedavg", "beta=0.5"].endswith("[n=1]")
    costs = pd.read_csv(tmp_path / "costs.csv", index_col=0)
    moments = costs[label("moments_seconds")]
    assert moments["ccvr"] > 0 and moments["fedavg"] == 0  # only CCVR pays the moment pass
    assert (costs[label("aggregation_seconds")] > 0).all()
    extra = costs[label("statistics_bytes")]
    assert extra["fedavg"] == 0 and extra["ccvr"] == 0  # CCVR's moments come after aggregation
    assert (costs[label("upload_bytes")] > 0).all() and (costs["runs"] == 1).all()
    assert "server aggregation per round (ms)" in (tmp_path / "costs.md").read_text()
    assert main(args) == 0  # everything finished: nothing re-run
    assert [os.stat(p).st_mtime_ns for p in summaries] == stamps


@pytest.mark.slow
def test_sweep_runs_on_the_flower_engine(tmp_path: Path):
    """``--set engine=flower`` runs the grid through the Flower Simulation Engine (not silently
    in-process)."""
    import json

    pytest.importorskip("flwr")
    base = ["--root", str(tmp_path), "--preset", "tiny", "--methods", "fedavg", "--betas", "0.5"]
    options = ["--set", "engine=flower", "rounds=1", "num_clients=2", "max_train=120"]
    assert main([*base, "--seeds", "0", *options]) == 0
    run = tmp_path / "synthetic-fedavg-b0.5-s0"
    assert json.loads((run / "summary.json").read_text())["engine"] == "flower"
    assert (run / "replies.csv").is_file()  # written by the Flower ServerApp only


def test_sweep_paired_table_against_a_brute_force_interval(tmp_path: Path):
    """--paired gives each run the listed methods less its own; paired.csv of the grid holds
    method - paired in points with the t-interval over runs (each seed's mean over its rounds),
    checked by hand."""
    from scipy import stats

    args = ["--root", str(tmp_path), "--preset", "tiny", "--methods", "fedavg", "livar-sigma"]
    args += ["--betas", "0.5", "--seeds", "0", "1", "--paired", "fedavg"]
    args += ["--set", "rounds=2", "num_clients=2", "max_train=120", "max_test=40"]
    assert main(args) == 0
    assert not (tmp_path / "synthetic-fedavg-b0.5-s0" / "paired.csv").exists()  # own method
    gains, run_means = [], []
    for seed in (0, 1):
        folder = tmp_path / f"synthetic-livar-sigma-b0.5-s{seed}"
        rows = pd.read_csv(folder / "paired.csv")
        assert list(rows["method"]) == ["fedavg", "fedavg"]
        own = pd.read_csv(folder / "metrics.csv")["test_accuracy"].to_numpy()
        seed_gains = list(100 * (own - rows["test_accuracy"].to_numpy()))
        gains += seed_gains
        run_means.append(sum(seed_gains) / len(seed_gains))
    table = pd.read_csv(tmp_path / "paired.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["paired"], row["n_rounds"], row["n_seeds"]) == (
        "livar-sigma",
        "fedavg",
        4,
        2,
    )
    assert row["mean"] == pytest.approx(sum(gains) / 4) and row["n_runs"] == 2
    spread = statistics.stdev(run_means)
    if spread > 0:
        low, high = stats.t.interval(0.95, 1, loc=sum(run_means) / 2, scale=spread / 2**0.5)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    else:  # identical run means: a zero-width interval at the mean
        assert row["ci_low"] == pytest.approx(row["mean"]) == pytest.approx(row["ci_high"])
    assert "livar-sigma − fedavg" in (tmp_path / "paired.md").read_text()
