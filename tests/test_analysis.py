"""analysis/: every figure and table regenerated from small hand-written artifacts.

The artifacts are written with known values, so the tests check what was plotted (series,
lengths, binned means computed by hand, heat-map matrices) and the table cells, not only that
files appear. One smoke test runs on a real ``livar-calibrate --preset tiny`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_run

from analysis.__main__ import main as analysis_main
from analysis.__main__ import parse_named_path
from analysis.artifacts import ArtifactError, CalibrationRun, FedRun
from analysis.federated_figures import (
    accuracy_curves,
    alpha_matrix,
    choose_rounds,
    plot_accuracy_curves,
    plot_accuracy_vs_beta,
    plot_alpha_heatmap,
)
from analysis.regenerate import regenerate
from analysis.shap_figures import (
    curve_agreement,
    plot_aposteriori,
    plot_shap_summary,
    table_bin_means,
)
from analysis.table_figures import plot_table_comparison, plot_table_heatmap, table_difference
from analysis.tables import (
    PAPER_TABLES,
    build_table,
    collect_sweeps,
    override_specs,
    write_costs,
    write_table,
)
from livar_calib.explain import binned_shap_curve
from livar_merge import GShapTable
from livar_merge.federated.sweep import MISSING_CELL
from livar_merge.tables import make_table

# ------------------------------------------------------------------------- artifacts by hand
Q_A = [5.0, 10.0, 30.0, 60.0, 70.0, 90.0, 100.0]
SHAP_A = [1.0, 3.0, 2.0, -1.0, -3.0, 5.0, 7.0]
# 4 bins of 25: [0,25) -> 1, 3 -> 2; [25,50) -> 2 -> 2; [50,75) -> -1, -3 -> -2; [75,100] -> 6
BINNED_A = [2.0, 2.0, -2.0, 6.0]
COUNTS_A = [2, 1, 2, 2]
Q_B = [0.0, 20.0, 55.0, 65.0, 80.0, 85.0, 95.0]
SHAP_B = [-2.0, -4.0, 1.0, 1.0, 2.0, 4.0, 6.0]
# [0,25) -> -3; [25,50) empty; [50,75) -> 1; [75,100] -> 4
BINNED_B = [-3.0, np.nan, 1.0, 4.0]
SAMPLES = [10, 10, 10, 20, 20, 30, 30]
CAL_TABLE = [[0.5, 0.4, 0.3], [0.6, 0.5, 0.4], [0.9, 0.7, 0.6]]


def write_calibration(
    root: Path,
    *,
    q_a: list[float] = Q_A,
    q_b: list[float] = Q_B,
    shap_a: list[float] = SHAP_A,
    shap_b: list[float] = SHAP_B,
    samples: bool = True,
    table: bool = True,
    proxy: str = "tiny-imagenet",
) -> Path:
    """A calibration run folder as livar-calibrate writes it (only what analysis reads)."""
    n = len(q_a)
    root.mkdir(parents=True)
    rows = pd.DataFrame(
        {
            "repeat_id": "b0.5-s0-r1",
            "beta": 0.5,
            "seed": 0,
            "round": 1,
            "client": [f"client_{i % 3}" for i in range(n)],
            "layer": [f"layer_{i}" for i in range(n)],
            "omega_a": np.linspace(0.1, 1.0, n),
            "omega_b": np.linspace(0.2, 2.0, n),
            "num_samples": (SAMPLES * (n // len(SAMPLES) + 1))[:n],
            "lam": 0.5,
            "relative_residual": 0.1,
            "q_a": q_a,
            "q_b": q_b,
        }
    )
    rows.to_csv(root / "rows.csv", index=False)
    pd.DataFrame({"q_a": shap_a, "q_b": shap_b}).to_csv(root / "shap_values.csv", index=False)
    info = {"base_value": 0.25, "features": ["q_a", "q_b"]}
    if samples:
        frame = pd.DataFrame({"q_a": shap_a, "q_b": shap_b, "num_samples": [0.01] * n})
        frame.to_csv(root / "shap_values_samples.csv", index=False)
        info["base_value_samples"] = 0.3
    (root / "shap.json").write_text(json.dumps(info))
    (root / "config.json").write_text(json.dumps({"config": {"proxy": proxy}, "config_hash": "x"}))
    if table:
        (root / "table").mkdir()
        make_table("cal-test", 1, CAL_TABLE, base_value=0.25).save(root / "table")
    return root


ALPHA_LAYERS = ["base_model.model.blocks.10.mlp.fc1", "base_model.model.blocks.2.attn.qkv"]
ALPHA_CLIENTS = ["client_2", "client_10", "client_1"]


def alpha_frame() -> pd.DataFrame:
    """Two rounds; weights w = round/10 + client index/100 + layer index/1000."""
    rows = []
    for r in (1, 2):
        for c, client in enumerate(ALPHA_CLIENTS):
            for l, layer in enumerate(ALPHA_LAYERS):
                rows.append(
                    {
                        "round": r,
                        "client": client,
                        "layer": layer,
                        "weight": r / 10 + c / 100 + l / 1000,
                    }
                )
    return pd.DataFrame(rows)


def write_sweep(root: Path) -> Path:
    """CIFAR-100 runs: LIVAR 3 seeds at beta 1 (93.57 (0.12)), FedAvg 2 seeds, CCVR and Fisher
    1 seed;
    the ablation at beta 0.05 without livar-sigma; one unfinished run."""
    for seed, acc in enumerate([0.9345, 0.9357, 0.9369]):
        write_run(
            root,
            "cifar100",
            "livar",
            1.0,
            seed,
            [0.5 + 0.1 * seed, acc],
            alpha=alpha_frame() if seed == 0 else None,
        )
    for seed, acc in enumerate([0.93, 0.934]):
        write_run(root, "cifar100", "fedavg", 1.0, seed, [0.4, acc])
    write_run(root, "cifar100", "ccvr", 1.0, 0, [0.3, 0.9327])
    write_run(root, "cifar100", "fisher", 1.0, 0, [0.3, 0.934])  # the registry's name
    for method, accs in {
        "fedavg": [0.7916, 0.7932],
        "livar-alpha": [0.7981, 0.7969],
        "livar": [0.9088, 0.9098],
    }.items():
        for seed, acc in enumerate(accs):
            write_run(root, "cifar100", method, 0.05, seed, [0.5, acc])
    write_run(root, "cifar100", "livar-sigma", 0.05, 0, [0.5], finished=False)
    return root


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    return write_calibration(tmp_path / "cal")


# ------------------------------------------------------------------------- Figures 2 and A
def test_figure2_plots_points_and_hand_computed_binned_means(calibration: Path, tmp_path: Path):
    run = CalibrationRun.open(calibration)
    assert run.name == "tiny-imagenet"  # from config.json
    out = plot_shap_summary(run.shap(), tmp_path / "f" / "figure2", title="Figure 2", bins=4)
    assert out.png.is_file() and out.pdf.is_file() and out.png.name == "figure2.png"
    points, curves = out.data["points"], out.data["curves"]
    assert list(points) == ["q_a", "q_b"]
    assert len(points["q_a"]) == len(Q_A) == len(points["q_b"])
    np.testing.assert_array_equal(points["q_a"]["quantile"], Q_A)
    np.testing.assert_array_equal(points["q_a"]["shap"], SHAP_A)
    np.testing.assert_array_equal(points["q_b"]["quantile"], Q_B)
    np.testing.assert_allclose(curves["q_a"]["mean_shap"], BINNED_A)
    np.testing.assert_array_equal(curves["q_a"]["count"], COUNTS_A)
    np.testing.assert_allclose(curves["q_b"]["mean_shap"], BINNED_B)  # empty bin: NaN
    np.testing.assert_array_equal(curves["q_b"]["count"], [2, 0, 2, 3])
    np.testing.assert_allclose(curves["q_a"]["q_mid"], [12.5, 37.5, 62.5, 87.5])
    assert out.data["mean_abs_shap"]["q_a"] == pytest.approx(np.mean(np.abs(SHAP_A)))
    assert out.data["base_value"] == 0.25
    assert "base value 0.25" in out.title


def test_figure_a_ranks_num_samples_over_all_rows(calibration: Path, tmp_path: Path):
    out = plot_shap_summary(
        CalibrationRun.open(calibration).shap(samples=True),
        tmp_path / "figureA",
        title="Figure A",
        bins=4,
    )
    assert list(out.data["points"]) == ["q_a", "q_b", "num_samples"]
    # samples 10 x3, 20 x2, 30 x2: mean positions 1, 3.5, 5.5 of 0..6
    expected = 100 * np.array([1, 1, 1, 3.5, 3.5, 5.5, 5.5]) / 6
    np.testing.assert_allclose(out.data["points"]["num_samples"]["quantile"], expected)
    np.testing.assert_allclose(out.data["points"]["num_samples"]["shap"], 0.01)
    assert out.data["base_value"] == 0.3  # base_value_samples


def test_shap_rows_mismatch_is_an_artifact_error(tmp_path: Path):
    root = write_calibration(tmp_path / "cal")
    pd.DataFrame({"q_a": [0.0], "q_b": [0.0]}).to_csv(root / "shap_values.csv", index=False)
    with pytest.raises(ArtifactError, match="same order"):
        CalibrationRun.open(root).shap()


# ------------------------------------------------------------------------- Figures 3, B-D
def test_curve_agreement_identical_reversed_and_constant():
    q = np.linspace(0, 100, 41)
    up = binned_shap_curve(q, q / 100, bins=10)
    down = binned_shap_curve(q, -q / 100, bins=10)
    flat = binned_shap_curve(q, np.zeros_like(q), bins=10)
    same = curve_agreement(up, up)
    assert same["spearman"] == pytest.approx(1.0) and same["bins_compared"] == 10
    assert curve_agreement(up, down)["spearman"] == pytest.approx(-1.0)
    constant = curve_agreement(up, flat)
    assert np.isnan(constant["spearman"]) and "constant" in constant["note"]
    with pytest.raises(ValueError, match="different bins"):
        curve_agreement(up, binned_shap_curve(q, q, bins=5))


@pytest.mark.parametrize(("sign", "rho"), [(1.0, 1.0), (-1.0, -1.0)])
def test_aposteriori_overlays_proxy_curve_and_reports_agreement(tmp_path: Path, sign, rho):
    q = list(np.linspace(0, 100, 21))
    shap = [v / 100 for v in q]
    proxy = write_calibration(
        tmp_path / "proxy", q_a=q, q_b=q, shap_a=shap, shap_b=shap, samples=False
    )
    other = write_calibration(
        tmp_path / "other",
        q_a=q,
        q_b=q,
        shap_a=[sign * s for s in shap],
        shap_b=[sign * s for s in shap],
        samples=False,
        proxy="imagenet-r",
    )
    proxy_run, other_run = CalibrationRun.open(proxy), CalibrationRun.open(other)
    table = proxy_run.table()
    out = plot_aposteriori(
        other_run.shap(),
        proxy_run.shap(),
        table,
        tmp_path / "figure3",
        dataset="imagenet-r",
        proxy="tiny-imagenet",
        title="Figure 3",
        bins=5,
    )
    for feature in ("q_a", "q_b"):
        agreement = out.data["agreement"][feature]
        assert agreement["spearman"] == pytest.approx(rho)
        assert agreement["bins_compared"] == 5
        assert agreement["trend_proxy"] == pytest.approx(1.0)
        assert agreement["trend_dataset"] == pytest.approx(rho)
        np.testing.assert_allclose(
            out.data["curves"][feature]["mean_shap"],
            sign * out.data["proxy_curves"][feature]["mean_shap"],
        )
    # the proxy table's bins stay fixed: edges 25, 50 for omega_A
    bins = out.data["table_bins"]["q_a"]
    assert bins["edges"] == [25.0, 50.0]
    proxy_points = pd.DataFrame({"quantile": q, "shap": shap})
    expected = [
        np.mean([s for v, s in zip(q, shap, strict=True) if v < 25]),
        np.mean([s for v, s in zip(q, shap, strict=True) if 25 <= v <= 50]),
        np.mean([s for v, s in zip(q, shap, strict=True) if v > 50]),
    ]
    np.testing.assert_allclose(bins["proxy"], expected)
    np.testing.assert_allclose(table_bin_means(proxy_points, (25.0, 50.0)), expected)
    np.testing.assert_allclose(bins["dataset"], sign * np.array(expected))
    assert out.png.is_file() and out.pdf.is_file()


# ------------------------------------------------------------------------- table figures
def test_table_heatmap_matrix_equals_table_values(tmp_path: Path):
    table = GShapTable.load("paper-table-a")
    out = plot_table_heatmap(table, tmp_path / "heat")
    np.testing.assert_array_equal(out.data["matrix"], table.values)
    np.testing.assert_array_equal(out.data["x_edges"], [0, 25, 50, 100])
    np.testing.assert_array_equal(out.data["y_edges"], [0, 60, 80, 100])
    assert out.data["row_labels"] == ["Q_B<60", "60<=Q_B<=80", "Q_B>80"]
    assert out.data["col_labels"] == ["Q_A<25", "25<=Q_A<=50", "Q_A>50"]
    assert out.png.stat().st_size > 0 and out.pdf.stat().st_size > 0


def test_table_comparison_difference_panel(tmp_path: Path):
    left = make_table("left", 1, CAL_TABLE)
    right = GShapTable.load("paper-table-a")
    out = plot_table_comparison(left, right, tmp_path / "cmp")
    a, b = np.array(CAL_TABLE), np.array(right.values)
    np.testing.assert_allclose(out.data["difference"], a / a.mean() - b / b.mean())
    np.testing.assert_array_equal(out.data["left"], a)
    assert out.data["same_edges"]
    np.testing.assert_allclose(table_difference(left, right, normalise=False), a - b)
    other = make_table("two-by-two", 1, [[1, 2], [3, 4]], edges_a=(50,), edges_b=(50,))
    assert plot_table_comparison(left, other, tmp_path / "shape").data["difference"] is None


# ------------------------------------------------------------------------- federated figures
def test_accuracy_curves_mean_and_std_over_seeds(tmp_path: Path):
    root = write_sweep(tmp_path / "sweep")
    runs = [FedRun.open(p) for p in sorted(root.iterdir()) if (p / "summary.json").is_file()]
    curves = accuracy_curves(runs)
    out = plot_accuracy_curves(curves, "cifar100", tmp_path / "acc")
    assert out.data["betas"] == [1.0, 0.05]
    assert out.data["methods"] == ["fedavg", "fisher", "ccvr", "livar-alpha", "livar"]
    livar = out.data["series"][(1.0, "livar")]
    np.testing.assert_array_equal(livar["round"], [1, 2])
    np.testing.assert_allclose(livar["mean"], [60.0, 93.57])
    np.testing.assert_allclose(livar["std"], [10.0, 0.12])
    np.testing.assert_array_equal(livar["n"], [3, 3])
    ccvr = out.data["series"][(1.0, "ccvr")]
    assert ccvr["std"].isna().all() and list(ccvr["n"]) == [1, 1]  # one seed: no band
    assert (0.05, "livar-sigma") not in out.data["series"]  # unfinished, not given
    with pytest.raises(ValueError, match="no accuracy curves"):
        plot_accuracy_curves(curves, "eurosat", tmp_path / "none")


def test_alpha_heatmap_matrices_keep_file_order(tmp_path: Path):
    folder = write_run(tmp_path, "cifar100", "livar", 1.0, 0, [0.5, 0.6], alpha=alpha_frame())
    out = plot_alpha_heatmap(FedRun.open(folder), tmp_path / "alpha")
    assert out.data["rounds"] == [1, 2]
    for r, matrix in out.data["matrices"].items():
        assert list(matrix.index) == ALPHA_CLIENTS  # not sorted as strings
        assert list(matrix.columns) == ALPHA_LAYERS
        expected = [[r / 10 + c / 100 + l / 1000 for l in range(2)] for c in range(3)]
        np.testing.assert_allclose(matrix.to_numpy(), expected)
    last = plot_alpha_heatmap(FedRun.open(folder), tmp_path / "last", rounds="last")
    assert last.data["rounds"] == [2]
    pd.testing.assert_frame_equal(alpha_matrix(alpha_frame(), 2), last.data["matrices"][2])
    assert choose_rounds(range(1, 11), "all", max_panels=4) == [1, 4, 7, 10]
    assert choose_rounds([1, 2, 3], [3, 9]) == [3]


# ------------------------------------------------------------------------- Tables 1-4
def test_paper_tables_cells_and_missing_marks(tmp_path: Path):
    rows, problems = collect_sweeps([write_sweep(tmp_path / "sweep")])
    assert problems == []
    assert len(rows) == 13  # the unfinished run is not collected
    table1 = build_table(rows, PAPER_TABLES["table1"])
    cells = table1.cells
    assert list(cells.index) == ["FedAvg", "RegMean", "FisherAvg", "FedProto", "CCVR", "LIVAR"]
    assert list(cells.columns) == [
        f"{d} β={b}" for d in ("CIFAR-100", "ImageNet-R") for b in ("1.0", "0.5", "0.2")
    ]
    assert cells.loc["LIVAR", "CIFAR-100 β=1.0"] == "93.57 (0.12)"
    assert cells.loc["FedAvg", "CIFAR-100 β=1.0"] == "93.20 (0.28)"
    assert cells.loc["CCVR", "CIFAR-100 β=1.0"] == "93.27 [n=1]"
    assert cells.loc["LIVAR", "ImageNet-R β=0.5"] == MISSING_CELL
    assert cells.loc["RegMean", "CIFAR-100 β=1.0"] == MISSING_CELL
    assert cells.loc["FisherAvg", "CIFAR-100 β=1.0"] == "93.40 [n=1]"
    assert (table1.missing, table1.total) == (32, 36)

    table4 = build_table(rows, PAPER_TABLES["table4"])
    t4 = table4.cells
    assert list(t4.columns) == ["α^l", "σ^(c)", "Avg (std)"]
    assert list(t4["α^l"]) == ["", "✓", "", "✓"]
    assert list(t4["σ^(c)"]) == ["", "", "✓", "✓"]
    assert t4.loc["FedAvg", "Avg (std)"] == "79.24 (0.11)"
    assert t4.loc["LIVAR", "Avg (std)"] == "90.93 (0.07)"
    assert t4.loc["LIVAR (σ only)", "Avg (std)"] == MISSING_CELL  # unfinished run
    assert table4.missing == 1

    files = write_table(table1, tmp_path / "tables")
    assert [f.name for f in files] == ["table1.csv", "table1.md", "table1_stats.csv"]
    back = pd.read_csv(files[0], index_col=0, keep_default_na=False)
    assert back.loc["LIVAR", "CIFAR-100 β=1.0"] == "93.57 (0.12)"
    assert back.loc["LIVAR", "ImageNet-R β=1.0"] == MISSING_CELL
    markdown = files[1].read_text()
    assert "| LIVAR | 93.57 (0.12) | — |" in markdown and "**Table 1**" in markdown
    stats = pd.read_csv(files[2])
    livar = stats.loc[(stats["method"] == "livar") & (stats["beta"] == 1.0)].iloc[0]
    assert livar["n"] == 3 and livar["mean"] == pytest.approx(0.9357)


def test_table_spec_overrides():
    specs = override_specs(PAPER_TABLES, {"table4": ["fashion-mnist"]}, [0.5], 0.1)
    assert specs["table4"].datasets == ("fashion-mnist",) and specs["table4"].betas == (0.1,)
    assert specs["table1"].betas == (0.5,)
    with pytest.raises(ValueError, match="exactly one dataset"):
        override_specs(PAPER_TABLES, {"table4": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown table"):
        override_specs(PAPER_TABLES, {"table9": ["a"]})


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


def test_accuracy_vs_beta_and_costs(tmp_path: Path):
    root = tmp_path / "sweep"
    finals = {(0.05, 0): 0.40, (0.05, 1): 0.46, (0.5, 0): 0.61, (0.5, 1): 0.65, (0.5, 2): 0.66}
    for (beta, seed), acc in finals.items():
        folder = write_run(
            root,
            "fashion-mnist",
            "regmean",
            beta,
            seed,
            [0.2, acc],
            timings={"aggregation_seconds": [0.07, 0.05 + seed / 100], "train_seconds": [9, 11]},
        )
        pd.DataFrame({"upload_bytes": [4e6, 2e6], "statistics_bytes": [3e6, 1e6]}).to_csv(
            folder / "clients.csv", index=False
        )
    write_run(root, "digits", "fedavg", 0.5, 0, [0.1, 0.2])
    rows, _ = collect_sweeps([root])
    out = plot_accuracy_vs_beta(rows, "fashion-mnist", tmp_path / "beta")
    assert out.png.is_file() and out.data["betas"] == [0.05, 0.5]
    stats = out.data["stats"].set_index("beta")
    assert stats.loc[0.5, "mean"] == pytest.approx(100 * np.mean([0.61, 0.65, 0.66]))
    assert stats.loc[0.05, "std"] == pytest.approx(100 * np.std([0.40, 0.46], ddof=1))
    with pytest.raises(ValueError, match="cifar100"):
        plot_accuracy_vs_beta(rows, "cifar100", tmp_path / "none")

    csv, md = write_costs([root], "fashion-mnist", tmp_path / "tables")
    costs = pd.read_csv(csv, index_col=0)
    all_aggregations = [0.07, 0.05, 0.07, 0.06, 0.07, 0.05, 0.07, 0.06, 0.07, 0.07]
    assert costs.loc["RegMean", "server aggregation per round (ms)"] == pytest.approx(
        1000 * np.median(all_aggregations)
    )
    assert costs.loc["RegMean", "upload per client (MB)"] == pytest.approx(3.0)
    assert costs.loc["RegMean", "of which statistics (MB)"] == pytest.approx(2.0)
    assert costs.loc["RegMean", "runs"] == 5 and list(costs.index) == ["RegMean"]
    assert "| RegMean | 70.0 | 10.0 | — | — | 3.00 | 2.00 | 5 |" in md.read_text()
    with pytest.raises(ArtifactError, match="digits"):
        write_costs([root], "digits", tmp_path / "tables")


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
    points with the t-interval over (seed, round); a sweep without paired rows is skipped."""
    from scipy import stats

    from analysis.federated_figures import plot_paired_vs_beta
    from livar_merge.federated.sweep import collect_paired

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
    x = 100 * np.array([g for seed in gains[0.05] for g in seed])
    low, high = stats.t.interval(0.95, 3, loc=x.mean(), scale=stats.sem(x))
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
