"""Paired evaluation (--paired) in whole runs: both engines and the pretrained backbone."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from livar_merge.apps.fed_cli import main
from livar_merge.engines.inprocess import run_federated
from tests.helpers import load_checkpoint, tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fedavg run with paired livar and livar-sigma, plus plain fedavg and plain livar-sigma
    runs of the same seed."""
    root = tmp_path_factory.mktemp("paired")
    out = {}
    for name, options in {
        "paired": {"method": "fedavg", "paired": ["livar", "livar-sigma"]},
        "fedavg": {"method": "fedavg"},
        "livar-sigma": {"method": "livar-sigma"},
    }.items():
        summary = run_federated(tiny(**options), root / name)
        out[name] = (root / name, summary)
    return out


def test_paired_csv_has_one_row_per_round_and_method(runs):
    folder, summary = runs["paired"]
    paired = pd.read_csv(folder / "paired.csv")
    assert len(paired) == 2 * 2
    assert sorted(zip(paired["round"], paired["method"], strict=True)) == [
        (1, "livar"),
        (1, "livar-sigma"),
        (2, "livar"),
        (2, "livar-sigma"),
    ]
    metrics = pd.read_csv(folder / "metrics.csv").set_index("round")
    own = metrics.loc[paired["round"], "test_accuracy"].to_numpy()
    np.testing.assert_allclose(paired["difference"], paired["test_accuracy"] - own, atol=1e-12)
    assert (paired["evaluation_seconds"] > 0).all() and (paired["aggregation_seconds"] > 0).all()
    assert (metrics["paired_seconds"] > 0).all()
    entry = summary["paired"]
    assert entry["against"] == "fedavg" and set(entry["methods"]) == {"livar", "livar-sigma"}
    last = paired[paired["round"] == 2].set_index("method")
    assert entry["methods"]["livar"]["final_difference"] == pytest.approx(
        last.loc["livar", "difference"]
    )


def test_paired_methods_leave_the_run_unchanged(runs):
    """The paired run's own trajectory is the plain fedavg run's, bit for bit."""
    (paired, s1), (plain, s2) = runs["paired"], runs["fedavg"]
    assert s1["accuracy_per_round"] == s2["accuracy_per_round"]
    got, expected = load_checkpoint(paired), load_checkpoint(plain)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_round_one_paired_model_equals_that_methods_own_run(runs):
    """Round 1: every client starts from the same seeded model and trains identically whatever
    the method, so livar-sigma paired on fedavg's updates must score exactly what a livar-sigma
    run scores after its round 1 (an independent computation of the same model)."""
    folder, _ = runs["paired"]
    paired = pd.read_csv(folder / "paired.csv")
    row = paired[(paired["round"] == 1) & (paired["method"] == "livar-sigma")].iloc[0]
    _, sigma_run = runs["livar-sigma"]
    assert row["test_accuracy"] == pytest.approx(sigma_run["accuracy_per_round"][0], abs=1e-12)
    own = pd.read_csv(runs["livar-sigma"][0] / "metrics.csv")
    assert row["test_loss"] == pytest.approx(own["test_loss"].iloc[0], rel=1e-6)


def test_paired_resume_gives_the_same_rows(tmp_path, runs):
    config = tiny(method="fedavg", paired=["livar", "livar-sigma"])
    run_federated(config, tmp_path, stop_after=1)
    run_federated(config, tmp_path, resume=True)
    got = pd.read_csv(tmp_path / "paired.csv")
    expected = pd.read_csv(runs["paired"][0] / "paired.csv")
    pd.testing.assert_frame_equal(
        got[["round", "method", "test_accuracy", "test_loss", "difference"]],
        expected[["round", "method", "test_accuracy", "test_loss", "difference"]],
    )


@pytest.mark.slow
def test_flower_engine_writes_the_same_paired_rows(tmp_path, runs):
    """Paired evaluation inside LivarStrategy: same rows as in-process (float tolerance)."""
    out = tmp_path / "flower"
    args = ["--preset", "tiny", "--method", "fedavg", "--paired", "livar", "livar-sigma"]
    assert main([*args, "--engine", "flower", "--out", str(out)]) == 0
    got = pd.read_csv(out / "paired.csv")
    expected = pd.read_csv(runs["paired"][0] / "paired.csv")
    assert list(got["method"]) == list(expected["method"])
    np.testing.assert_allclose(got["test_accuracy"], expected["test_accuracy"], atol=1.01 / 200)
    np.testing.assert_allclose(got["test_loss"], expected["test_loss"], rtol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["paired"]["methods"]) == {"livar", "livar-sigma"}


@pytest.mark.slow
def test_pretrained_cpu_preset_end_to_end_with_paired_methods(tmp_path):
    """``livar-fed --preset cpu --paired fedavg livar-sigma`` on the real converted DINOv2
    backbone (shrunk: digits, 2 clients, 1 round); the provenance names the source."""
    pytest.importorskip("onnx")
    out = tmp_path / "run"
    args = ["--preset", "cpu", "--dataset", "digits", "--num-clients", "2", "--rounds", "2"]
    args += ["--local-epochs", "1", "--max-train", "80", "--max-test", "40", "--beta", "0.5"]
    args += ["--min-client-samples", "10", "--paired", "fedavg", "livar-sigma", "--out", str(out)]
    assert main(args) == 0
    paired = pd.read_csv(out / "paired.csv")
    assert len(paired) == 2 * 2 and set(paired["method"]) == {"fedavg", "livar-sigma"}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model_weights"].startswith("dinov2-s14-imgfocus:")
    weights = prov["weights_provenance"]
    assert weights["onnx_sha256"].startswith("198644e3") and "Apache-2.0" in str(
        weights["licences"]
    )
