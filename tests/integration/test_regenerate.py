"""python -m analysis: regenerating every figure and table over run folders (hand-written ones, and
one real ``livar-calibrate --preset tiny`` folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main as analysis_main
from analysis.__main__ import parse_named_path
from analysis.regenerate import regenerate
from livar_merge.apps.grid_results import MISSING_CELL
from tests.helpers import (
    alpha_frame,
    write_calibration,
    write_run,
    write_sweep,
)


# ------------------------------------------------------------------------- the command
def test_regenerate_everything_and_catalogue(tmp_path: Path, capsys):
    cal = write_calibration(tmp_path / "cal", samples=False)
    q = list(np.linspace(0, 100, 7))
    other = write_calibration(tmp_path / "imr", q_a=q, q_b=q, proxy="imagenet-r")
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    catalogue = regenerate(
        out, calibration=cal, a_posteriori=[(None, other)], sweeps=[sweep], bins=4
    )
    printed = capsys.readouterr().out
    entries = {e.id: e for e in catalogue.entries}

    assert entries["figure2"].status == "made"
    assert entries["figure2"].files == ["figures/figure2.png", "figures/figure2.pdf"]
    figure_a = entries["figureA"]
    assert figure_a.status == "skipped" and "no shap_values_samples.csv" in figure_a.reason
    assert "Figure A: skipped, calibration run" in printed
    assert entries["figure3"].status == "made"  # name from the run's config.json
    assert entries["figure3"].files[0] == "figures/figure3-imagenet-r.png"
    assert entries["figureB"].status == "skipped" and "cifar100" in entries["figureB"].reason
    agreement = pd.read_csv(out / "tables" / "aposteriori_agreement.csv")
    assert list(agreement["feature"]) == ["q_a", "q_b"]
    assert agreement["spearman"].between(-1, 1).all()
    assert entries["table-heatmap-calibration"].status == "made"
    assert entries["table-comparison"].status == "made"
    assert entries["accuracy-cifar100"].status == "made"
    assert "livar-sigma" in entries["accuracy-unfinished"].reason
    assert entries["alpha-cifar100-livar-b1-s0"].status == "made"  # first LIVAR seed
    assert (
        entries["table1"].status == "made" and "32 of 36 cells missing" in entries["table1"].detail
    )
    assert entries["table2"].status == "skipped"
    assert "no finished run" in entries["table2"].reason and "CIFAR-100" in entries["table2"].reason
    assert entries["table4"].status == "made"
    assert entries["results-cifar100"].status == "made"
    assert entries["ablation-cifar100"].status == "made"
    assert entries["accuracy-vs-beta-cifar100"].status == "made"
    assert "records costs" in entries["costs-cifar100"].reason  # hand-made runs have none
    assert catalogue.count("failed") == 0

    document = json.loads((out / "catalogue.json").read_text())
    assert document["counts"] == {
        "made": catalogue.count("made"),
        "skipped": catalogue.count("skipped"),
        "failed": 0,
    }
    saved = {e["id"]: e for e in document["entries"]}
    assert saved["figureA"]["status"] == "skipped"
    for entry in document["entries"]:
        for file in entry["files"]:
            assert (out / file).is_file(), file
    markdown = (out / "tables" / "table1.md").read_text().splitlines()
    assert sum(line.count(MISSING_CELL) for line in markdown if line.startswith("|")) == 32


def test_regenerate_without_inputs_skips_with_reasons(tmp_path: Path):
    catalogue = regenerate(tmp_path / "out", log=None, runs=[tmp_path / "nothing"])
    entries = {e.id: e for e in catalogue.entries}
    assert "--calibration" in entries["figure2"].reason
    assert entries["table-heatmap-reference"].status == "made"  # shipped paper-table-a
    assert entries["table-comparison"].status == "skipped"
    assert entries["accuracy"].status == "skipped" and entries["alpha"].status == "skipped"
    assert "--sweeps" in entries["table1"].reason
    assert catalogue.count("failed") == 0


def test_cli(tmp_path: Path, capsys):
    cal = write_calibration(tmp_path / "cal")
    run = write_run(tmp_path / "runs", "digits", "livar", 0.5, 0, [0.3, 0.4], alpha=alpha_frame())
    assert parse_named_path("cub200=/x/y") == ("cub200", Path("/x/y"))
    assert parse_named_path("/x/a=b") == (None, Path("/x/a=b"))
    code = analysis_main(
        [
            "--calibration",
            str(cal),
            "--runs",
            str(run),
            "--out",
            str(tmp_path / "out"),
            "--bins",
            "5",
            "--alpha-rounds",
            "last",
        ]
    )
    assert code == 0
    document = json.loads((tmp_path / "out" / "catalogue.json").read_text())
    made = {e["id"] for e in document["entries"] if e["status"] == "made"}
    assert {"figure2", "figureA", "accuracy-digits", f"alpha-{run.name}"} <= made
    assert "Figure A: made figures/figureA.png" in capsys.readouterr().out


def test_cli_fails_when_no_input_given_is_usable(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    code = analysis_main(["--sweeps", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == 2 and "nothing could be made" in capsys.readouterr().err
    assert analysis_main(["--out", str(tmp_path / "out2")]) == 0  # no inputs: nothing expected


# ------------------------------------------------------------------------- real run (smoke)
@pytest.mark.slow
def test_smoke_on_a_real_tiny_calibration(tmp_path: Path):
    pytest.importorskip("shap")
    from livar_calib.cli import main as calibrate

    cal = tmp_path / "cal"
    assert calibrate(["--preset", "tiny", "--out", str(cal), "--threads", "1"]) == 0
    catalogue = regenerate(
        tmp_path / "out", log=None, calibration=cal, a_posteriori=[("imagenet-r", cal)]
    )
    entries = {e.id: e for e in catalogue.entries}
    for key in ("figure2", "figureA", "figure3", "table-heatmap-calibration", "table-comparison"):
        assert entries[key].status == "made", entries[key]
    rows = pd.read_csv(cal / "rows.csv")
    curves = pd.read_csv(tmp_path / "out" / "tables" / "aposteriori_curves.csv")
    for (feature, source), curve in curves.groupby(["feature", "source"]):
        assert len(curve) == 20 and curve["count"].sum() == len(rows), (feature, source)
    agreement = pd.read_csv(tmp_path / "out" / "tables" / "aposteriori_agreement.csv")
    np.testing.assert_allclose(agreement["spearman"], 1.0)  # the same run on both sides


def test_paired_vs_beta_hand_computed_intervals(tmp_path: Path):
    """paired.csv rows (difference = fedavg - livar on livar's updates) -> livar - fedavg in
    points with the t-interval over runs (seeds); a sweep without paired rows is skipped."""
    from scipy import stats

    from analysis.federated_figures import plot_paired_vs_beta
    from livar_merge.apps.grid_results import collect_paired

    root = tmp_path / "sweep"
    gains = {0.05: [[0.02, 0.05], [0.01, 0.04]], 0.5: [[0.00, -0.01], [0.01, 0.02]]}
    for beta, per_seed in gains.items():
        for seed, seed_gains in enumerate(per_seed):
            own = [0.6, 0.7]
            folder = write_run(root, "fashion-mnist", "livar", beta, seed, own)
            pd.DataFrame(
                {
                    "round": [1, 2],
                    "method": "fedavg",
                    "test_accuracy": [o - g for o, g in zip(own, seed_gains, strict=True)],
                    "test_loss": 1.0,
                    "difference": [-g for g in seed_gains],
                    "aggregation_seconds": 0.1,
                    "evaluation_seconds": 1.0,
                }
            ).to_csv(folder / "paired.csv", index=False)
        write_run(root, "fashion-mnist", "fedavg", beta, 0, [0.5, 0.6])
    out = plot_paired_vs_beta(collect_paired(root), "fashion-mnist", tmp_path / "paired")
    assert out.png.is_file() and out.data["methods"] == ["livar"]
    table = out.data["table"].set_index("beta")
    x = 100 * np.array([np.mean(seed) for seed in gains[0.05]])  # runs (seeds) are the unit
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert table.loc[0.05, "mean"] == pytest.approx(x.mean())
    assert (table.loc[0.05, "ci_low"], table.loc[0.05, "ci_high"]) == pytest.approx((low, high))
    assert table.loc[0.05, "final_mean"] == pytest.approx(100 * np.mean([0.05, 0.04]))
    assert (table.loc[0.5, "won"], table.loc[0.5, "lost"]) == (2, 1)

    catalogue = regenerate(tmp_path / "out", sweeps=[root])
    entry = {e.id: e for e in catalogue.entries}["paired-vs-beta-fashion-mnist"]
    assert entry.status == "made", entry.reason
    assert (tmp_path / "out/tables/paired-fashion-mnist.md").is_file()
    plain = tmp_path / "plain"
    write_run(plain, "fashion-mnist", "fedavg", 0.5, 0, [0.5, 0.6])
    catalogue = regenerate(tmp_path / "out2", sweeps=[plain])
    entry = {e.id: e for e in catalogue.entries}["paired-vs-beta-fashion-mnist"]
    assert entry.status == "skipped" and "--paired fedavg" in entry.reason
