"""livar-fed --engine flower: the Flower Simulation Engine against the in-process engine."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from tests.helpers import assert_accuracies_match, load_checkpoint  # noqa: E402


@pytest.mark.slow
def test_simulation_engine_stopped_and_resumed_matches_the_inprocess_run(tmp_path, inprocess_run):
    """A Flower run stopped after round 1 and resumed from its folder (a new Flower run, new
    nodes) gives the uninterrupted in-process run's model, rows and accuracies."""
    from livar_merge.apps.fed_cli import main

    reference_out, reference = inprocess_run
    out = tmp_path / "flower"
    start = time.perf_counter()
    args = ["--preset", "tiny", "--engine", "flower", "--out", str(out)]
    tracked = importlib.util.find_spec("tensorboard") is not None
    if tracked:  # the ServerApp mirrors the folder, and continues its tracker when resumed
        args += ["--track", "tensorboard"]
    assert main([*args, "--stop-after", "1"]) == 0
    assert not (out / "summary.json").exists()
    assert len(pd.read_csv(out / "metrics.csv")) == 1
    assert main([*args, "--resume"]) == 0
    seconds = time.perf_counter() - start
    print(f"Simulation Engine, tiny, 3 clients x (1 + 1 resumed) rounds: {seconds:.1f} s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["completed_rounds"] == 2
    assert summary["resumed_after"] == [1]
    assert pd.read_csv(out / "metrics.csv")["round"].tolist() == [1, 2]
    if tracked:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("round/test_accuracy")]
        expected = pd.read_csv(out / "metrics.csv")["test_accuracy"].tolist()
        assert [s for s, _ in logged] == [1, 2]
        np.testing.assert_allclose([v for _, v in logged], expected, rtol=1e-6)
    assert_accuracies_match(summary["accuracy_per_round"], reference["accuracy_per_round"], 200)
    got, expected = load_checkpoint(out), load_checkpoint(reference_out)
    assert got.keys() == expected.keys()
    assert any(k.startswith("base/") for k in got)  # product mode: folded frozen weights
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    for name in ("config.json", "provenance.json", "metrics.csv", "metrics.json", "clients.csv"):
        assert (out / name).is_file(), name
    replies = pd.read_csv(out / "replies.csv")
    assert len(replies) == 6 and replies["accepted"].all()
    alpha = pd.read_csv(out / "alpha.csv")
    pd.testing.assert_frame_equal(
        alpha[["round", "client", "layer", "bin_a", "bin_b"]],
        pd.read_csv(reference_out / "alpha.csv")[["round", "client", "layer", "bin_a", "bin_b"]],
    )
    assert json.loads((out / "config.json").read_text())["config"]["engine"] == "flower"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["regmean", "fisher", "fedproto", "livar+ccvr"])
def test_simulation_engine_runs_the_baselines_as_livar_fed(tmp_path, method):
    """Grams, Fisher and prototypes travel in the replies, FedProto's prototypes back to the
    clients, CCVR's moments through a QUERY round: the same global model as in-process."""
    from livar_merge.apps.fed_cli import main

    args = ["--preset", "tiny", "--method", method, "--fisher-samples", "16"]
    args += ["--ccvr-samples", "32", "--ccvr-epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "inprocess")]) == 0
    assert main([*args, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    reference = json.loads((tmp_path / "inprocess" / "summary.json").read_text())
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert_accuracies_match(summary["accuracy_per_round"], reference["accuracy_per_round"], 200)
    got = load_checkpoint(tmp_path / "flower")
    expected = load_checkpoint(tmp_path / "inprocess")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    clients = pd.read_csv(tmp_path / "flower" / "clients.csv")
    reference_clients = pd.read_csv(tmp_path / "inprocess" / "clients.csv")
    assert list(clients["statistics_bytes"]) == list(reference_clients["statistics_bytes"])
    metrics = pd.read_csv(tmp_path / "flower" / "metrics.csv")
    assert ((metrics["moments_seconds"] > 0) == method.endswith("ccvr")).all()


@pytest.mark.slow
def test_released_protocol_on_both_engines(tmp_path, inprocess_run):
    """--protocol released: the same reported accuracies and global factors on both engines;
    against the paper default on the same seed, the factors are kept (no fold) and the
    reported model is the sample-weighted product, so the accuracies differ."""
    from livar_merge.apps.fed_cli import main

    args = ["--preset", "tiny", "--protocol", "released"]
    assert main([*args, "--out", str(tmp_path / "inprocess")]) == 0
    assert main([*args, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    runs = {
        name: json.loads((tmp_path / name / "summary.json").read_text())
        for name in ("inprocess", "flower")
    }
    assert_accuracies_match(
        runs["flower"]["accuracy_per_round"], runs["inprocess"]["accuracy_per_round"], 200
    )
    got, expected = load_checkpoint(tmp_path / "flower"), load_checkpoint(tmp_path / "inprocess")
    assert not any(k.startswith("base/") for k in expected)  # factors: nothing folded
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    saved = json.loads((tmp_path / "inprocess" / "config.json").read_text())["config"]
    assert (saved["protocol"], saved["lora_merge"], saved["augment"]) == (
        "released",
        "factors",
        "rrc",
    )
    assert saved["lora_alpha"] == saved["lora_rank"]
    _, paper = inprocess_run
    assert runs["inprocess"]["accuracy_per_round"] != paper["accuracy_per_round"]
