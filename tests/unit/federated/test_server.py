"""The flwr-free round (FederatedServer) against independent computations."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from livar_merge.aggregation import make_aggregator
from livar_merge.errors import ConfigError
from livar_merge.federated.data import derive_seed
from livar_merge.federated.global_state import GlobalStateError, global_tensors
from livar_merge.federated.server import FederatedServer
from livar_merge.lora_view import find_lora_parameters, head_module
from tests.helpers import NUM_CLASSES, tiny_vit
from tests.helpers import fake_server_update as fake_update


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
    with pytest.raises(ConfigError, match="paired evaluation needs evaluate"):
        FederatedServer(model, method="livar", seed=3, paired=paired)


def test_ccvr_decision_seed_and_moments(model):
    calls = []

    class Clients:  # an engine's ClientQuery that takes 0.05 s
        def moments(self, updates, *, full_covariance):
            calls.append(([u.client_id for u in updates], full_covariance))
            time.sleep(0.05)
            rng = np.random.default_rng(0)
            width = head_module(model).weight.shape[1]
            moments = {
                "mean": rng.normal(size=(NUM_CLASSES, width)),
                "cov": np.stack([np.eye(width)] * NUM_CLASSES),
                "count": np.full(NUM_CLASSES, 10.0),
            }
            return [moments, moments]

    options = {"ccvr_samples": 16, "ccvr_epochs": 1, "ccvr_rounds": "last"}
    server = FederatedServer(
        copy.deepcopy(model), method="ccvr", method_options=options, seed=5, rounds=2
    )
    updates = [fake_update(model, f"client_{m}", m) for m in range(2)]
    first = server.aggregate_round(1, updates, clients=Clients())
    assert calls == [] and first.moments_seconds == 0.0  # "last" of 2 rounds: not after 1
    before = head_module(server.model).weight.detach().clone()
    second = server.aggregate_round(2, updates, clients=Clients())
    assert calls == [(["client_0", "client_1"], True)] and second.moments_seconds >= 0.05
    assert second.aggregation_seconds < second.moments_seconds + 5  # query time kept apart
    # the installed head was re-trained in place: equal to refine_head on the merged head
    merged = second.result.head
    weight, _ = server.aggregator.refine_head(
        merged.weight,
        merged.bias,
        Clients().moments(updates, full_covariance=True),
        seed=derive_seed(5, 2, "ccvr"),
    )
    torch.testing.assert_close(head_module(server.model).weight.detach(), weight)
    assert not torch.equal(before, weight)
    with pytest.raises(ConfigError, match="method 'ccvr' needs a client query"):
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
    assert server.broadcast() == {} and server.state_tensors() == {}  # before any round
    record = server.aggregate_round(1, updates)
    sent = server.broadcast()["prototypes"]
    np.testing.assert_allclose(sent.numpy(), record.result.details["prototypes"], rtol=1e-6)
    # a hand-worked pooled prototype: count-weighted mean of the two clients' class means
    means = [u.extras["proto_mean"] for u in updates]
    expected = (3.0 * means[0][0] + 4.0 * means[1][0]) / 7.0
    np.testing.assert_allclose(sent[0].numpy(), expected, rtol=1e-5)
    state = server.state_tensors()
    assert list(state) == ["server/prototypes"]  # the checkpoint key of earlier runs
    again = FederatedServer(copy.deepcopy(model), method="fedproto", seed=0)
    again.load_state_tensors({**state, "lora/other": torch.zeros(1)})
    torch.testing.assert_close(again.broadcast()["prototypes"], sent)


def test_server_checks_lora_targets_when_built():
    """FederatedServer (under LivarStrategy and the in-process runner alike) refuses a model
    that cannot carry the global state before any round."""
    plain = tiny_vit(num_classes=3)
    with pytest.raises(GlobalStateError, match="not a peft model"):
        FederatedServer(plain, seed=0, method="livar")


def test_released_evaluated_model_is_w0_plus_the_sample_weighted_product(model):
    """--protocol released: the reported model is W0 + sum_m n_m/N s B_m A_m (LoRA off, the
    merged head), computed here densely on a copy; the clients' global model (the LIVAR factor
    merge) comes back bit for bit after the evaluation."""
    updates = [fake_update(model, f"client_{m}", m) for m in range(3)]
    server = FederatedServer(
        copy.deepcopy(model),
        method="livar",
        seed=7,
        lora_merge="factors",
        evaluated="sample-weighted-product",
    )
    server.aggregate_round(1, updates)
    before = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    dense = dense_product_merge(model, updates, np.repeat((n / n.sum())[:, None], 8, axis=1))
    expected = copy.deepcopy(server.model)
    modules = dict(expected.named_modules())
    with torch.no_grad():
        for layer, weight in dense.items():
            modules[layer].base_layer.weight.copy_(weight.float())
            modules[layer].lora_B["default"].weight.zero_()
    x = torch.randn(4, 3, 16, 16)
    expected.eval()
    with server.evaluated_model() as evaluated:
        evaluated.eval()
        torch.testing.assert_close(evaluated(x), expected(x), rtol=1e-5, atol=1e-5)
    for key, value in server.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    paper = FederatedServer(copy.deepcopy(model), method="livar", seed=7)
    paper.aggregate_round(1, updates)
    with paper.evaluated_model() as evaluated:
        assert evaluated is paper.model and paper.evaluated_delta is None
    with pytest.raises(
        ConfigError, match="sample-weighted evaluated model needs lora_merge 'factors'"
    ):
        FederatedServer(model, method="livar", seed=0, evaluated="sample-weighted-product")


def test_pretrained_sigma_uses_w0_after_a_product_fold(model):
    """--sigma-pass pretrained: features of the pretrained backbone W0 even after a round has
    been folded into the frozen weights (disable_adapter alone would see the folded ones)."""
    from livar_merge.federated.collectors import pretrained_backbone
    from livar_merge.federated.model import forward_with_features

    w0 = {
        layer: module.base_layer.weight.detach().clone()
        for layer, module in model.named_modules()
        if layer in find_lora_parameters(model)
    }
    reference = copy.deepcopy(model)
    server = FederatedServer(copy.deepcopy(model), method="fedavg", seed=7)
    server.aggregate_round(1, [fake_update(model, f"client_{m}", m) for m in range(2)])
    folded = server.model
    x = torch.randn(4, 3, 16, 16)
    folded.eval(), reference.eval()
    with torch.no_grad():
        expected, _ = forward_with_features(reference, x)  # B = 0: the backbone is W0
        with pretrained_backbone(folded, w0):
            got, _ = forward_with_features(folded, x)
        with pretrained_backbone(folded, None):  # the old behaviour: folded weights
            stale, _ = forward_with_features(folded, x)
    torch.testing.assert_close(got, expected)
    assert (stale - expected).abs().max() > 1e-3
    for layer, weight in w0.items():  # restored: the folded weights are back
        assert not torch.equal(dict(folded.named_modules())[layer].base_layer.weight, weight)


def test_the_server_names_no_method():
    """FederatedServer reaches methods only through the Aggregator hooks: no identifier or
    string of federated/server.py (docstrings and comments aside) names a method or its state."""
    import ast
    import re

    from tests.helpers import REPO

    source = (REPO / "livar_merge" / "federated" / "server.py").read_text()
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    names = re.compile(r"ccvr|fedproto|prototype|regmean|fisher|calibrate", re.I)
    found = []
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = None if id(node) in docstrings else node.value
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            text = node.name
        if text and names.search(text):
            found.append((getattr(node, "lineno", 0), text))
    assert found == []
