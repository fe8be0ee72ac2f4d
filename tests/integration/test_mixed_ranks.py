"""livar-fed with clients of mixed LoRA ranks (--client-ranks) on the tiny preset: the first
product merge folded into the global model against a float64 Eq. 3 over the clients' own factors
and scalings, svd runs and their discarded energy, refusals before training, resume."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from livar_merge.apps.fed_cli import main
from livar_merge.engines.inprocess import FederatedRun, run_federated
from livar_merge.federated.server import FederatedServer
from tests.helpers import load_checkpoint, tiny

RANKS = [2, 4, 8]  # the tiny preset's global model has lora_rank 4, lora_alpha 4


@pytest.fixture
def captured(monkeypatch):
    """Every aggregate_round call's updates, the global frozen weights before it and the
    record it returned."""
    calls = []
    original = FederatedServer.aggregate_round

    def capture(self, round_index, updates, **kwargs):
        modules = dict(self.model.named_modules())
        before = {
            layer: modules[layer].base_layer.weight.detach().double().clone()
            for layer in self.layer_names
        }
        record = original(self, round_index, updates, **kwargs)
        calls.append({"updates": list(updates), "before": before, "record": record})
        return record

    monkeypatch.setattr(FederatedServer, "aggregate_round", capture)
    return calls


@pytest.mark.parametrize("method", ["livar", "fedavg"])
def test_first_product_merge_is_eq3_over_the_clients_own_ranks(tmp_path, captured, method):
    config = tiny(client_ranks=RANKS, method=method, rounds=1)
    run = FederatedRun(config, tmp_path)
    run.run()
    (call,) = captured
    updates, record = call["updates"], call["record"]
    assert [u.scaling for u in updates] == [config.lora_alpha / r for r in RANKS]
    total = sum(u.num_samples for u in updates)
    modules = dict(run.model.named_modules())
    for l, layer in enumerate(run.server.layer_names):
        expected = call["before"][layer].clone()
        for m, (update, rank) in enumerate(zip(updates, RANKS, strict=True)):
            b = update.lora[f"{layer}.lora_B.weight"].double()
            a = update.lora[f"{layer}.lora_A.weight"].double()
            assert b.shape[1] == a.shape[0] == rank
            weight = update.num_samples / total
            if method == "livar":
                weight = float(record.result.lora_weights[m, l])
            for i in range(rank):  # sum_m alpha_m (lora_alpha / r_m) B_m A_m, one term at a time
                expected += weight * (config.lora_alpha / rank) * torch.outer(b[:, i], a[i])
        got = modules[layer].base_layer.weight.detach().double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if method == "livar":
        np.testing.assert_allclose(record.result.lora_weights.sum(axis=0), 1.0)
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert clients["lora_rank"].tolist() == RANKS


def test_svd_runs_and_reports_the_discarded_energy(tmp_path):
    summary = run_federated(tiny(client_ranks=RANKS, lora_merge="svd"), tmp_path)
    assert summary["completed_rounds"] == 2
    energy = pd.read_csv(tmp_path / "svd_energy.csv")
    assert set(energy["stage"]) == {"merge", "client-start"}
    assert energy["discarded_energy"].between(0.0, 1.0).all()
    merge = energy[energy["stage"] == "merge"]
    assert len(merge) == 2 * 8 and set(merge["rank"]) == {4}  # rounds x layers, the svd target
    start = energy[energy["stage"] == "client-start"]
    assert set(start["rank"]) == {2}  # only the client below the global rank is truncated
    assert (start[start["round"] == 1]["discarded_energy"] == 0.0).all()  # B A = 0 at start
    assert (start[start["round"] == 2]["discarded_energy"] > 0.0).all()
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    means = merge.groupby("round")["discarded_energy"].mean().to_numpy()
    np.testing.assert_allclose(metrics["svd_discarded_energy"], means)
    tensors = load_checkpoint(tmp_path)  # the global model keeps lora_rank
    assert {v.shape[0] for k, v in tensors.items() if ".lora_A." in k} == {4}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lora-merge", "factors"], "with lora_merge 'factors' needs one LoRA rank"),
        (["--method", "fisher"], "'fisher' needs one LoRA rank"),
    ],
)
def test_refused_before_anything_is_built(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--client-ranks", "2", "4", "8", "--out", str(out), *options]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_gives_the_same_result(tmp_path):
    config = tiny(client_ranks=RANKS, lora_merge="svd")
    whole = run_federated(config, tmp_path / "whole")
    run_federated(config, tmp_path / "resumed", stop_after=1)
    resumed = run_federated(config, tmp_path / "resumed", resume=True)
    assert resumed["accuracy_per_round"] == whole["accuracy_per_round"]
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for table in ("alpha.csv", "svd_energy.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "whole" / table), pd.read_csv(tmp_path / "resumed" / table)
        )
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["config"]["client_ranks"] == RANKS


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["product", "svd"])
def test_flower_simulation_matches_the_inprocess_run(tmp_path, request, merge):
    """Each ClientApp trains its partition at the rank of the cycling rule and replies its
    scaling; the global model and accuracies equal the in-process run's."""
    pytest.importorskip("flwr")
    request.getfixturevalue("task_identity")  # messages need a running task's identity
    from tests.helpers import assert_accuracies_match

    args = ["--preset", "tiny", "--client-ranks", "2", "4", "8", "--lora-merge", merge]
    assert main([*args, "--out", str(tmp_path / "inprocess")]) == 0
    assert main([*args, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    reference = json.loads((tmp_path / "inprocess" / "summary.json").read_text())
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert_accuracies_match(summary["accuracy_per_round"], reference["accuracy_per_round"], 200)
    got, expected = load_checkpoint(tmp_path / "flower"), load_checkpoint(tmp_path / "inprocess")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    replies = pd.read_csv(tmp_path / "flower" / "replies.csv")
    assert replies["accepted"].all()
    clients = pd.read_csv(tmp_path / "flower" / "clients.csv")
    assert clients["lora_rank"].tolist() == RANKS * 2
    if merge == "svd":
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "flower" / "svd_energy.csv"),
            pd.read_csv(tmp_path / "inprocess" / "svd_energy.csv"),
            atol=1e-6,
        )
