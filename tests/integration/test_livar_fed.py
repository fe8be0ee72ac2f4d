"""livar-fed end to end on the tiny preset: the results folder, resume, every method and merge
mode, the command line, server state across a resume."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from livar_merge.engines.inprocess import run_federated
from livar_merge.errors import ConfigError
from livar_merge.federated.config import resolve_config
from livar_merge.federated.run_folder import RunFolderError
from tests.helpers import tiny


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run_federated(tiny(rounds=2), out)
    return out, summary


def test_results_folder(finished_run):
    out, summary = finished_run
    for name in (
        "config.json",
        "provenance.json",
        "partition.csv",
        "metrics.csv",
        "metrics.json",
        "clients.csv",
        "alpha.csv",
        "head_weights.csv",
        "summary.json",
        "checkpoint/global.safetensors",
        "checkpoint/state.json",
    ):
        assert (out / name).is_file(), name
    assert summary["completed_rounds"] == 2 and len(summary["accuracy_per_round"]) == 2
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["table"]["name"] == "paper-table-a" and prov["table"]["checksum"].startswith(
        "sha256:"
    )
    assert prov["packages"]["torch"] and prov["seed"] == 42 and "commit" in prov["git"]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method"] == "livar" and len(config["config_hash"]) == 64
    partition = pd.read_csv(out / "partition.csv", index_col=0)
    assert partition.shape == (3, 11) and partition["total"].sum() == 400
    assert (partition["total"] >= 10).all()
    alpha = pd.read_csv(out / "alpha.csv")
    assert len(alpha) == 2 * 3 * 8  # rounds x clients x (4 Linears x 2 blocks)
    np.testing.assert_allclose(alpha.groupby(["round", "layer"])["weight"].sum(), 1.0)
    assert {"omega_a", "omega_b", "bin_a", "bin_b"} <= set(alpha.columns)
    assert (alpha["omega_a"] > 0).all() and (alpha["omega_b"] > 0).all()
    heads = pd.read_csv(out / "head_weights.csv")
    sums = heads.groupby(["round", "class"])["weight"].sum()
    assert ((np.isclose(sums, 1.0)) | (np.isclose(sums, 0.0))).all()
    clients = pd.read_csv(out / "clients.csv")
    assert len(clients) == 6 and (clients["steps"] > 0).all()


def test_resume_gives_the_same_result(finished_run, tmp_path):
    out, summary = finished_run
    interrupted = tmp_path / "interrupted"
    first = run_federated(tiny(rounds=2), interrupted, stop_after=1)
    assert first["completed_rounds"] == 1 and not (interrupted / "summary.json").exists()
    resumed = run_federated(tiny(rounds=2), interrupted, resume=True)
    assert resumed["accuracy_per_round"] == summary["accuracy_per_round"]
    from safetensors.torch import load_file

    a = load_file(str(out / "checkpoint/global.safetensors"))
    b = load_file(str(interrupted / "checkpoint/global.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "alpha.csv"), pd.read_csv(interrupted / "alpha.csv")
    )


def test_refuses_to_mix_runs(finished_run):
    out, _ = finished_run
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        run_federated(tiny(rounds=2), out)
    with pytest.raises(RunFolderError, match="different configuration.*beta"):
        run_federated(tiny(rounds=2, beta=0.1), out, resume=True)


@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ("fedavg", "svd"),
        ("livar-sigma", "factors"),
        ("livar-alpha", "svd"),
        ("regmean", "product"),
        ("regmean", "svd"),
        ("fisher", "product"),
        ("fedproto", "product"),
        ("ccvr", "product"),
        ("livar+ccvr", "factors"),
    ],
)
def test_every_method_and_merge_mode_runs(tmp_path, method, mode):
    small = dict(num_clients=2, max_train=120, max_test=40, fisher_samples=16, ccvr_samples=32)
    config = tiny(rounds=2, lora_merge=mode, method=method, ccvr_epochs=1, **small)
    summary = run_federated(config, tmp_path)
    assert len(summary["accuracy_per_round"]) == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    clients = pd.read_csv(tmp_path / "clients.csv")
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert (metrics["aggregation_seconds"] > 0).all()
    assert ((metrics["moments_seconds"] > 0) == method.endswith("ccvr")).all()
    # hand-worked sizes of the tiny preset: width D = 32, 2 blocks, MLP 128, r = 4, 10 classes
    lora_elements = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    head_elements = 10 * 32 + 10
    if method == "fedavg":  # factors and head in float32, nothing else
        assert (clients["upload_bytes"] == 4 * (lora_elements + head_elements)).all()
        assert (clients["statistics_bytes"] == 0).all()
    if method == "regmean":  # float64 Grams: qkv, proj, fc1 see D inputs, fc2 sees 4D; head D+1
        gram_elements = 2 * (3 * 32**2 + 128**2) + 33**2
        assert (clients["statistics_bytes"] == 8 * gram_elements).all()
        assert (
            clients["upload_bytes"] == 4 * (lora_elements + head_elements) + 8 * gram_elements
        ).all()
    assert (clients["statistics_seconds"] >= 0).all()
    assert (clients["statistics_seconds"] < clients["seconds"]).all()


def test_cli_end_to_end_and_errors(tmp_path):
    from livar_merge.apps.fed_cli import main

    config = tmp_path / "run.toml"
    config.write_text('method = "fedavg"\nrounds = 1\nnum-clients = 2\nmax-train = 100\n')
    assert main(["--preset", "tiny", "--config", str(config), "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r/config.json").read_text())["config"]["method"] == "fedavg"
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--lora-merge", "average"])
    missing, out = str(tmp_path / "nowhere"), str(tmp_path / "x")
    argv = ["--preset", "tiny", "--dataset", "fashion-mnist", "--data-root", missing, "--out", out]
    assert main(argv) == 2
    assert Path(tmp_path / "r/summary.json").is_file()


def test_fedproto_server_state_survives_resume(tmp_path):
    options = {
        "rounds": 3,
        "method": "fedproto",
        "num_clients": 2,
        "max_train": 120,
        "max_test": 40,
    }
    straight = run_federated(tiny(**options), tmp_path / "a")
    run_federated(tiny(**options), tmp_path / "b", stop_after=2)
    resumed = run_federated(tiny(**options), tmp_path / "b", resume=True)
    assert resumed["accuracy_per_round"] == straight["accuracy_per_round"]


def test_ccvr_last_round_only_is_fedavg_then_a_calibrated_head(tmp_path):
    """--ccvr-rounds last: the rounds before the last are FedAvg's exactly; the last changes only
    the head (CCVR calibrates post hoc, as its paper)."""
    from safetensors.torch import load_file

    common = {"rounds": 2, "num_clients": 2, "max_train": 120, "max_test": 40}
    ccvr = {**common, "method": "ccvr", "ccvr_rounds": "last", "ccvr_samples": 32}
    run_federated(tiny(**ccvr), tmp_path / "ccvr")
    run_federated(tiny(**common, method="fedavg"), tmp_path / "fedavg")
    metrics = pd.read_csv(tmp_path / "ccvr" / "metrics.csv")
    reference = pd.read_csv(tmp_path / "fedavg" / "metrics.csv")
    assert metrics["moments_seconds"].iloc[0] == 0 and metrics["moments_seconds"].iloc[1] > 0
    assert metrics["test_accuracy"].iloc[0] == reference["test_accuracy"].iloc[0]
    got = load_file(str(tmp_path / "ccvr" / "checkpoint" / "global.safetensors"))
    expected = load_file(str(tmp_path / "fedavg" / "checkpoint" / "global.safetensors"))
    for key, value in expected.items():
        assert torch.equal(got[key], value) != key.startswith("head/"), key
    with pytest.raises(ConfigError, match="option ccvr_rounds must be one of.*'first'"):
        tiny(ccvr_rounds="first")
    # an option added later leaves the hash of older runs (at its default) unchanged
    body = {k: v for k, v in tiny().to_dict().items() if k != "ccvr_rounds"}
    assert resolve_config(None, None, body).config_hash() == tiny().config_hash()
    assert tiny().config_hash() != tiny(ccvr_rounds="last").config_hash()
