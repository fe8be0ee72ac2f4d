"""Accuracy curves, alpha heat maps, accuracy vs beta and costs (analysis.federated_figures) from
hand-written run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.artifacts import ArtifactError
from analysis.federated_figures import (
    accuracy_curves,
    alpha_matrix,
    choose_rounds,
    plot_accuracy_curves,
    plot_accuracy_vs_beta,
    plot_alpha_heatmap,
)
from analysis.tables import (
    collect_sweeps,
    write_costs,
)
from livar_merge.federated.run_layout import RunReader
from tests.helpers import (
    ALPHA_CLIENTS,
    ALPHA_LAYERS,
    alpha_frame,
    write_run,
    write_sweep,
)


# ------------------------------------------------------------------------- federated figures
def test_accuracy_curves_mean_and_std_over_seeds(tmp_path: Path):
    root = write_sweep(tmp_path / "sweep")
    runs = [RunReader.open(p) for p in sorted(root.iterdir()) if (p / "summary.json").is_file()]
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
    with pytest.raises(ArtifactError, match="no accuracy curves for dataset 'eurosat'"):
        plot_accuracy_curves(curves, "eurosat", tmp_path / "none")


def test_alpha_heatmap_matrices_keep_file_order(tmp_path: Path):
    folder = write_run(tmp_path, "cifar100", "livar", 1.0, 0, [0.5, 0.6], alpha=alpha_frame())
    out = plot_alpha_heatmap(RunReader.open(folder), tmp_path / "alpha")
    assert out.data["rounds"] == [1, 2]
    for r, matrix in out.data["matrices"].items():
        assert list(matrix.index) == ALPHA_CLIENTS  # not sorted as strings
        assert list(matrix.columns) == ALPHA_LAYERS
        expected = [[r / 10 + c / 100 + l / 1000 for l in range(2)] for c in range(3)]
        np.testing.assert_allclose(matrix.to_numpy(), expected)
    last = plot_alpha_heatmap(RunReader.open(folder), tmp_path / "last", rounds="last")
    assert last.data["rounds"] == [2]
    pd.testing.assert_frame_equal(alpha_matrix(alpha_frame(), 2), last.data["matrices"][2])
    assert choose_rounds(range(1, 11), "all", max_panels=4) == [1, 4, 7, 10]
    assert choose_rounds([1, 2, 3], [3, 9]) == [3]


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
    with pytest.raises(ArtifactError, match="no finished sweep runs for dataset 'cifar100'"):
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
