"""The flwr-free round (FederatedServer), the run-folder writer, the memory codec and the peft
key conventions, each against an independent computation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from livar_merge.aggregation import ClientUpdate, make_aggregator
from livar_merge.federated.client import ClientMemory, TrainReport
from livar_merge.federated.data import derive_seed
from livar_merge.federated.model import head_module
from livar_merge.federated.peft_keys import (
    GlobalStateError,
    check_lora_targets,
    global_tensors,
    load_global_tensors,
    lora_key,
    lora_state,
    parameter_name,
)
from livar_merge.federated.run_folder import RunFolder, RunFolderError, client_rows
from livar_merge.federated.server import FederatedServer
from livar_merge.signals import ImportanceTracker, find_lora_parameters
from tests import helpers
from tests.helpers import tiny_peft_vit, tiny_vit

NUM_CLASSES = 5


def fake_update(model: torch.nn.Module, client_id: str, seed: int) -> ClientUpdate:
    extras = {"train_loss": 0.5 + seed, "train_seconds": 1.0}
    return helpers.fake_update(model, client_id, seed, num_classes=NUM_CLASSES, extras=extras)


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_peft_vit(rank=4, alpha=8.0, num_classes=NUM_CLASSES, seed=0)


def dense_product_merge(model, updates, weights):
    """Eq. 3 written out: W0 + s * sum_m w_ml B_m A_m per layer (dense)."""
    scaling = 8.0 / 4
    out = {}
    modules = dict(model.named_modules())
    for l, layer in enumerate(find_lora_parameters(model)):
        delta = sum(
            weights[m, l]
            * u.lora[f"{layer}.lora_B.weight"].double()
            @ u.lora[f"{layer}.lora_A.weight"].double()
            for m, u in enumerate(updates)
        )
        out[layer] = modules[layer].base_layer.weight.detach().double() + scaling * delta
    return out


@pytest.mark.parametrize("method", ["livar", "fedavg"])
def test_round_folds_eq3_and_restarts_the_lora(model, method):
    updates = [fake_update(model, f"client_{m}", m) for m in range(3)]
    server = FederatedServer(copy.deepcopy(model), method=method, seed=7)
    record = server.aggregate_round(1, updates, train_seconds=2.5)
    weights = record.result.lora_weights
    expected = dense_product_merge(model, updates, weights)
    modules = dict(server.model.named_modules())
    for layer, weight in expected.items():
        got = modules[layer].base_layer.weight.detach().double()
        torch.testing.assert_close(got, weight, rtol=1e-5, atol=1e-6)
        assert not modules[layer].lora_B["default"].weight.abs().any()  # B restarted at 0
    # A restarted from derive_seed(seed, round, "lora-restart"): replay it on a copy
    replay = copy.deepcopy(model)
    torch.manual_seed(derive_seed(7, 1, "lora-restart"))
    replay_modules = dict(replay.named_modules())
    for layer in find_lora_parameters(model):
        replay_modules[layer].reset_lora_parameters("default", True)
        torch.testing.assert_close(
            modules[layer].lora_A["default"].weight, replay_modules[layer].lora_A["default"].weight
        )
    assert record.train_seconds == 2.5 and record.aggregation_seconds > 0
    assert record.outcomes is None and record.paired == []


def test_round_equals_the_aggregator_and_reports_metrics(model):
    updates = [fake_update(model, f"client_{m}", m) for m in range(3)]
    server = FederatedServer(copy.deepcopy(model), method="livar-sigma", seed=1)
    previous = server.previous_head()
    record = server.aggregate_round(2, updates)
    reference = make_aggregator("livar-sigma").aggregate(
        updates, previous_head=previous, scaling=server.scalings
    )
    torch.testing.assert_close(head_module(server.model).weight, reference.head.weight)
    np.testing.assert_array_equal(record.result.lora_weights, reference.lora_weights)
    row, paired = server.metrics_row(record, 0.75, 1.25)
    assert row["round"] == 2 and row["test_accuracy"] == 0.75 and row["test_loss"] == 1.25
    assert row["uncovered_classes"] == 0 and paired == []
    assert "replies_accepted" not in row  # in-process records have no reply outcomes


def test_paired_rows_get_differences_and_leave_the_model_alone(model):
    updates = [fake_update(model, f"client_{m}", m) for m in range(3)]
    scores = iter([0.6, 0.4])

    def evaluate(candidate):
        return next(scores), 1.0

    from livar_merge.federated.paired import PairedEvaluation

    paired = PairedEvaluation("livar", ["fedavg", "livar-alpha"], {}, lora_merge="product", seed=3)
    own = FederatedServer(copy.deepcopy(model), method="livar", seed=3)
    both = FederatedServer(
        copy.deepcopy(model), method="livar", seed=3, paired=paired, evaluate=evaluate
    )
    own.aggregate_round(1, updates)
    record = both.aggregate_round(1, updates)
    for key, value in global_tensors(own.model, "product").items():  # trajectory unchanged
        torch.testing.assert_close(global_tensors(both.model, "product")[key], value)
    _, rows = both.metrics_row(record, 0.5, 1.0)
    assert [(r["method"], r["difference"]) for r in rows] == [
        ("fedavg", pytest.approx(0.1)),
        ("livar-alpha", pytest.approx(-0.1)),
    ]
    with pytest.raises(ValueError, match="paired evaluation needs evaluate"):
        FederatedServer(model, method="livar", seed=3, paired=paired)


def test_ccvr_decision_seed_and_moments(model):
    calls = []

    def query(updates, full):
        calls.append(([u.client_id for u in updates], full))
        rng = np.random.default_rng(0)
        width = head_module(model).weight.shape[1]
        moments = {
            "mean": rng.normal(size=(NUM_CLASSES, width)),
            "cov": np.stack([np.eye(width)] * NUM_CLASSES),
            "count": np.full(NUM_CLASSES, 10.0),
        }
        return [moments, moments], 0.25

    options = {"ccvr_samples": 16, "ccvr_epochs": 1}
    server = FederatedServer(
        copy.deepcopy(model), method="ccvr", method_options=options, seed=5, ccvr_round=2
    )
    updates = [fake_update(model, f"client_{m}", m) for m in range(2)]
    first = server.aggregate_round(1, updates, query_moments=query)
    assert calls == [] and first.moments_seconds == 0.0  # ccvr_round=2: not after round 1
    second = server.aggregate_round(2, updates, query_moments=query)
    assert calls == [(["client_0", "client_1"], True)] and second.moments_seconds == 0.25
    with pytest.raises(ValueError, match="needs query_moments"):
        server.aggregate_round(2, updates)


def test_prototypes_are_server_state(model):
    width = head_module(model).weight.shape[1]
    updates = []
    for m in range(2):
        update = fake_update(model, f"client_{m}", m)
        update.extras["proto_mean"] = np.random.default_rng(m).normal(size=(NUM_CLASSES, width))
        update.extras["proto_count"] = np.full(NUM_CLASSES, 3.0 + m)
        updates.append(update)
    server = FederatedServer(copy.deepcopy(model), method="fedproto", seed=0)
    record = server.aggregate_round(1, updates)
    np.testing.assert_allclose(server.prototypes.numpy(), record.result.details["prototypes"])
    again = FederatedServer(copy.deepcopy(model), method="fedproto", seed=0)
    again.load_state_tensors(server.state_tensors())
    torch.testing.assert_close(again.prototypes, server.prototypes)


# ------------------------------------------------------------------------- memory codec
def test_memory_codec_keeps_float64_exactly(model):
    tracker = ImportanceTracker(model)
    omega = torch.tensor([1 / 3, 1e-300, 2.0**60 + 1.0] * (len(tracker.layer_names) * 2 // 3))
    state = {**tracker.state_dict(), "omega": omega.double(), "steps": 9}
    record = ClientMemory(tracker_state=state).to_record()
    json_round_trip = json.loads(json.dumps(record))
    restored = ClientMemory.from_record(json_round_trip).tracker_state
    assert restored["omega"].dtype == torch.float64
    assert torch.equal(restored["omega"], omega.double())  # float32 would round 1/3
    assert restored["steps"] == 9 and restored["layer_names"] == list(tracker.layer_names)
    legacy = {"tracker_state": {**record, "layer_names": record["layer-names"]}}
    assert torch.equal(ClientMemory.from_record(legacy).tracker_state["omega"], omega.double())
    assert ClientMemory.from_record(None).tracker_state is None
    assert ClientMemory().to_record() is None


def test_train_report_is_the_source_of_client_rows(model):
    report = TrainReport(loss=0.5, accuracy=0.8, steps=3, seconds=1.5, upload_bytes=10)
    update = fake_update(model, "client_0", 0)
    update.extras = report.extras()
    server = FederatedServer(copy.deepcopy(model), method="fedavg", seed=0)
    (row,) = client_rows(server.aggregate_round(1, [update]))
    assert row == {
        "round": 1,
        "client": "client_0",
        "num_samples": update.num_samples,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "steps": 3,
        "seconds": 1.5,
        "statistics_seconds": 0.0,
        "upload_bytes": 10,
        "statistics_bytes": 0,
    }


# ---------------------------------------------------------------------------- run folder
def test_run_folder_checkpoint_round_trip_and_refusals(model, tmp_path):
    from livar_merge.federated.config import resolve_config

    config = resolve_config("tiny", None, {"method": "fedproto"})
    folder = RunFolder(tmp_path / "run", config)
    assert folder.check(resume=True) is False  # nothing to resume yet
    server = FederatedServer(copy.deepcopy(model), method="fedavg", seed=0)
    updates = [fake_update(model, f"client_{m}", m) for m in range(2)]
    record = server.aggregate_round(1, updates)
    row, paired = server.metrics_row(record, 0.5, 1.0)
    folder.write_header({"seed": 0})
    folder.add_round(record, row, paired)
    folder.rows.memories["client_0"] = {"omega": [0.1], "steps": 1, "layer-names": ["x"]}
    folder.write_tables()
    prototypes = {"server/prototypes": torch.randn(NUM_CLASSES, 4)}
    folder.save_checkpoint(server.model, prototypes)
    assert {p.name for p in folder.out.iterdir()} >= {
        "config.json",
        "provenance.json",
        "metrics.csv",
        "metrics.json",
        "clients.csv",
        "alpha.csv",
        "head_weights.csv",
        "checkpoint",
    }
    assert not (folder.out / "paired.csv").exists() and not (folder.out / "replies.csv").exists()
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        RunFolder(folder.out, config).check(resume=False)
    with pytest.raises(RunFolderError, match="choose --out$"):
        RunFolder(folder.out, config).check(resume=False, resumable=False)
    other = resolve_config("tiny", None, {"method": "fedproto", "beta": 0.1})
    with pytest.raises(RunFolderError, match="different configuration"):
        RunFolder(folder.out, other).check(resume=True)
    resumed = RunFolder(folder.out, config)
    assert resumed.check(resume=True) is True
    fresh = copy.deepcopy(model)
    server_tensors = resumed.load_checkpoint(fresh)
    torch.testing.assert_close(server_tensors["server/prototypes"], prototypes["server/prototypes"])
    for key, value in global_tensors(server.model, "product").items():
        torch.testing.assert_close(global_tensors(fresh, "product")[key], value)
    assert resumed.rows.metrics == folder.rows.metrics
    assert resumed.rows.memories == folder.rows.memories and resumed.rows.completed_rounds == 1


# ------------------------------------------------------------------------ peft key names
def test_key_conventions_match_peft(model):
    import peft

    reference = peft.get_peft_model_state_dict(model)
    mine = lora_state(model)
    assert set(mine) == {k for k in reference if ".lora_" in k}
    for key, value in mine.items():
        torch.testing.assert_close(value, reference[key])
        assert lora_key(parameter_name(key)) == key
        assert parameter_name(key) in dict(model.named_parameters())


def test_load_global_tensors_names_the_bad_key(model):
    tensors = global_tensors(model, "product")
    with pytest.raises(GlobalStateError, match="'lora/nope.lora_A.weight' names no parameter"):
        load_global_tensors(model, {"lora/nope.lora_A.weight": torch.zeros(1)})
    key = "head/weight"
    with pytest.raises(GlobalStateError, match="'head/weight' has shape"):
        load_global_tensors(model, {key: torch.zeros(tensors[key].shape[0] + 1, 3)})


def test_check_lora_targets_before_any_round():
    import peft

    good = tiny_peft_vit()
    assert check_lora_targets(good) == tuple(find_lora_parameters(good))
    plain = tiny_vit(num_classes=3)
    with pytest.raises(GlobalStateError, match="not a peft model"):
        check_lora_targets(plain)
    no_head = peft.get_peft_model(
        copy.deepcopy(plain), peft.LoraConfig(r=2, target_modules=["qkv"])
    )
    with pytest.raises(GlobalStateError, match="trainable Linear"):
        check_lora_targets(no_head)
    dora = peft.get_peft_model(
        copy.deepcopy(plain),
        peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True, modules_to_save=["head"]),
    )
    with pytest.raises(GlobalStateError, match="DoRA"):
        check_lora_targets(dora)


def test_server_checks_lora_targets_when_built():
    """FederatedServer (under LivarStrategy and the in-process runner alike) refuses a model
    that cannot carry the global state before any round."""
    plain = tiny_vit(num_classes=3)
    with pytest.raises(GlobalStateError, match="not a peft model"):
        FederatedServer(plain, seed=0, method="livar")
