"""livar-fed --clients-per-round on the tiny preset: the sampled clients train (clients.csv,
metrics.csv), G_SHAP's quantiles run over the participants' omegas only, a resumed run samples
and computes the same, and the Flower Simulation Engine samples the same clients."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from livar_merge.engines.inprocess import run_federated
from livar_merge.federated.sampling import sample_participants
from livar_merge.tables import GShapTable
from tests.helpers import assert_accuracies_match, brute_force_alpha, load_checkpoint, tiny

OPTIONS = {"num_clients": 5, "clients_per_round": 2, "rounds": 3}
IDS = [f"client_{m}" for m in range(5)]


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled")
    return out, run_federated(tiny(**OPTIONS), out)


def test_the_sampled_clients_train_and_are_recorded(sampled_run):
    out, summary = sampled_run
    assert summary["completed_rounds"] == 3
    clients = pd.read_csv(out / "clients.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    for r in (1, 2, 3):
        expected = sample_participants(IDS, 2, seed=42, round_index=r)
        assert list(clients.loc[clients["round"] == r, "client"]) == expected
        assert metrics.loc[metrics["round"] == r, "participants"].item() == " ".join(expected)
    # across rounds more than two distinct clients trained
    assert clients["client"].nunique() > 2


def test_gshap_quantiles_run_over_the_participants_omegas(sampled_run):
    out, _ = sampled_run
    alpha = pd.read_csv(out / "alpha.csv")
    grid = GShapTable.load("paper-table-a").values
    for r, rows in alpha.groupby("round"):
        participants = sample_participants(IDS, 2, seed=42, round_index=int(r))
        assert sorted(rows["client"].unique()) == participants
        layers = list(dict.fromkeys(rows["layer"]))
        wide = {
            k: rows.pivot(index="client", columns="layer", values=k)[layers]
            for k in ("omega_a", "omega_b", "weight")
        }
        expected = brute_force_alpha(wide["omega_a"].to_numpy(), wide["omega_b"].to_numpy(), grid)
        np.testing.assert_allclose(wide["weight"].to_numpy(), expected, rtol=1e-9)


def test_resume_samples_and_computes_the_same(sampled_run, tmp_path):
    out, summary = sampled_run
    interrupted = tmp_path / "interrupted"
    run_federated(tiny(**OPTIONS), interrupted, stop_after=1)
    resumed = run_federated(tiny(**OPTIONS), interrupted, resume=True)
    assert resumed["accuracy_per_round"] == summary["accuracy_per_round"]
    pd.testing.assert_frame_equal(
        pd.read_csv(interrupted / "clients.csv")[["round", "client", "num_samples", "train_loss"]],
        pd.read_csv(out / "clients.csv")[["round", "client", "num_samples", "train_loss"]],
    )
    got, expected = load_checkpoint(interrupted), load_checkpoint(out)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("method", ["fedproto", "livar+ccvr"])
def test_stateful_methods_run_over_the_participants(tmp_path, method):
    summary = run_federated(tiny(**{**OPTIONS, "method": method, "rounds": 2}), tmp_path)
    assert summary["completed_rounds"] == 2
    heads = pd.read_csv(tmp_path / "head_weights.csv")
    for r in (1, 2):
        expected = sample_participants(IDS, 2, seed=42, round_index=r)
        assert sorted(heads.loc[heads["round"] == r, "client"].unique()) == expected


@pytest.mark.slow
def test_the_simulation_engine_samples_the_same_clients(sampled_run, tmp_path):
    pytest.importorskip("flwr")
    from livar_merge.apps.fed_cli import main

    out, summary = sampled_run
    flower = tmp_path / "flower"
    args = ["--preset", "tiny", "--num-clients", "5", "--clients-per-round", "2", "--rounds", "3"]
    assert main([*args, "--engine", "flower", "--out", str(flower)]) == 0
    got = json.loads((flower / "summary.json").read_text())
    assert_accuracies_match(got["accuracy_per_round"], summary["accuracy_per_round"], 200)
    columns = ["round", "client", "num_samples"]
    pd.testing.assert_frame_equal(
        pd.read_csv(flower / "clients.csv")[columns], pd.read_csv(out / "clients.csv")[columns]
    )
    metrics = pd.read_csv(flower / "metrics.csv")
    assert list(metrics["participants"]) == list(pd.read_csv(out / "metrics.csv")["participants"])
    replies = pd.read_csv(flower / "replies.csv")
    assert len(replies) == 6 and replies["accepted"].all()  # 2 sampled nodes x 3 rounds
