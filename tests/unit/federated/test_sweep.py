"""livar-sweep's accuracy and timing tables from hand-written run folders."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest

from livar_merge.apps.grid_results import (
    MISSING_CELL,
    collect_costs,
    collect_results,
    cost_table,
    results_table,
)
from tests.helpers import cost_label as label
from tests.helpers import write_run


def test_results_table_mean_std_and_marks(tmp_path: Path):
    for seed, acc in enumerate([0.60, 0.64, 0.65]):
        write_run(tmp_path, "fashion-mnist", "livar", 0.5, seed, [0.3, acc])
    write_run(tmp_path, "fashion-mnist", "fedavg", 0.5, 0, [0.3, 0.61])
    write_run(tmp_path, "fashion-mnist", "fedavg", 0.05, 0, [0.3, 0.2], finished=False)
    cells, stats = results_table(
        collect_results(tmp_path), methods=["fedavg", "livar", "ccvr"], betas=[0.05, 0.5]
    )
    accs = [60.0, 64.0, 65.0]
    expected = f"{statistics.mean(accs):.2f} ({statistics.stdev(accs):.2f})"
    assert cells.loc["livar", "beta=0.5"] == expected == "63.00 (2.65)"
    assert cells.loc["fedavg", "beta=0.5"] == "61.00 [n=1]"
    assert cells.loc["fedavg", "beta=0.05"] == MISSING_CELL  # unfinished run: not collected
    assert (cells.loc["ccvr"] == MISSING_CELL).all()
    assert len(stats) == 2


def test_cost_table_medians_over_all_rows(tmp_path: Path):
    """Medians per method over every round (metrics.csv) or client-round (clients.csv) of every
    run, against statistics.median, in the units of the labels."""
    agg = {0: [0.010, 0.012, 0.011], 1: [0.009, 0.030, 0.013]}
    train = {0: [10.0, 11.0, 12.0], 1: [9.0, 13.0, 14.0]}
    uploads = {0: [1_000_000, 3_000_000], 1: [2_000_000, 8_000_000]}
    for seed in (0, 1):
        folder = write_run(
            tmp_path,
            "fashion-mnist",
            "ccvr",
            0.5,
            seed,
            [0.3, 0.5, 0.6],
            timings={
                "aggregation_seconds": agg[seed],
                "train_seconds": train[seed],
                "moments_seconds": [1.0 + seed, 2.0, 3.0],
            },
        )
        pd.DataFrame(
            {"round": 1, "client": ["client_0", "client_1"], "upload_bytes": uploads[seed]}
        ).to_csv(folder / "clients.csv", index=False)
    # an older run folder without the moment column nor clients.csv: missing, not zero
    write_run(
        tmp_path,
        "fashion-mnist",
        "fedavg",
        0.5,
        0,
        [0.3, 0.5],
        timings={"aggregation_seconds": [0.004, 0.006], "train_seconds": [5.0, 7.0]},
    )
    table = cost_table(collect_costs(tmp_path), methods=["fedavg", "ccvr", "regmean"])
    ccvr = table.loc["ccvr"]
    agg_ms = statistics.median([1000 * v for v in agg[0] + agg[1]])
    assert ccvr[label("aggregation_seconds")] == pytest.approx(agg_ms)
    assert ccvr[label("train_seconds")] == pytest.approx(11.5)
    assert ccvr[label("moments_seconds")] == pytest.approx(2.0)
    assert ccvr[label("upload_bytes")] == pytest.approx(2.5)  # MB
    assert pd.isna(ccvr[label("statistics_bytes")])
    assert ccvr["runs"] == 2
    assert table.loc["fedavg", label("aggregation_seconds")] == pytest.approx(5.0)
    assert pd.isna(table.loc["fedavg", label("moments_seconds")])
    assert table.loc["regmean", "runs"] == 0 and table.loc["regmean"].iloc[:-1].isna().all()


def test_run_grid_refuses_a_finished_run_of_other_options(tmp_path: Path, monkeypatch):
    """A finished run is skipped only when its stored options are the grid's own; one of other
    options (here another local_epochs) is refused before any run starts, naming the folder."""
    import json

    from livar_merge.apps import sweep
    from livar_merge.errors import RunFolderError
    from livar_merge.federated.config import resolve_config
    from livar_merge.federated.run_folder import write_run_header

    started: list[str] = []
    monkeypatch.setattr(sweep, "run_with_engine", lambda config, folder, resume: started.append(1))
    grid = {"preset": "tiny", "methods": ["fedavg", "livar"], "betas": [0.5], "seeds": [0]}

    def finish(method: str, **options) -> Path:
        config = resolve_config("tiny", None, {"method": method, "beta": 0.5, "seed": 0, **options})
        folder = tmp_path / config.run_name()
        folder.mkdir()
        write_run_header(folder, config, {})
        (folder / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
        return folder

    finish("fedavg")
    other = finish("livar", local_epochs=7)
    with pytest.raises(RunFolderError, match="other options than this grid") as err:
        sweep.run_grid(tmp_path, overrides={}, **grid)
    assert str(other) in str(err.value) and "local_epochs" in str(err.value)
    assert started == []

    # the same run with the grid's options is skipped like the finished fedavg
    (other / "summary.json").unlink()
    (other / "config.json").unlink()
    finish_again = resolve_config("tiny", None, {"method": "livar", "beta": 0.5, "seed": 0})
    write_run_header(other, finish_again, {})
    (other / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
    folders = sweep.run_grid(tmp_path, overrides={}, **grid)
    assert started == [] and len(folders) == 2
