import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from livar_merge.federated.config import resolve_config
from livar_merge.federated.install import install_result
from livar_merge.federated.model import create_backbone
from livar_merge.federated.run_folder import RunFolderError
from livar_merge.federated.runner import FederatedRun, run_federated
from livar_merge.lora import merge_lora
from tests.helpers import fresh_imports


def tiny(**overrides):
    return resolve_config("tiny", None, overrides)


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
    with pytest.raises(ValueError, match="different configuration.*beta"):
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


def test_product_merge_folds_eq3_into_the_frozen_weights(tmp_path):
    run = FederatedRun(tiny(), tmp_path)
    gen = torch.Generator().manual_seed(0)
    layers = run.federation.info.lora_layers
    modules = dict(run.model.named_modules())
    states = []
    for _ in range(3):
        state = {}
        for layer in layers:
            base = modules[layer].base_layer.weight
            state[f"{layer}.lora_A.weight"] = torch.randn(4, base.shape[1], generator=gen)
            state[f"{layer}.lora_B.weight"] = torch.randn(base.shape[0], 4, generator=gen)
        states.append(state)
    alpha = np.random.default_rng(0).dirichlet(np.ones(3), size=len(layers)).T
    before = {layer: modules[layer].base_layer.weight.detach().clone() for layer in layers}
    lora = merge_lora(states, alpha, scaling=run.federation.scalings)

    class Result:  # the parts of AggregationResult that install_result() reads
        pass

    result = Result()
    result.lora = lora
    head = run.model.base_model.model.head.modules_to_save["default"]
    result.head = type("H", (), {"weight": head.weight * 0 + 1, "bias": head.bias * 0})()
    install_result(run.model, result, lora_merge="product", seed=run.config.seed, round_index=1)
    for l, layer in enumerate(layers):
        scale = run.federation.scalings[layer]
        expected = before[layer] + scale * sum(
            alpha[m, l] * states[m][f"{layer}.lora_B.weight"] @ states[m][f"{layer}.lora_A.weight"]
            for m in range(3)
        )
        torch.testing.assert_close(modules[layer].base_layer.weight, expected, rtol=1e-5, atol=1e-5)
        assert (modules[layer].lora_B["default"].weight == 0).all()  # LoRA restarted
    assert (head.weight == 1).all()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_from_files_and_no_hub(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model, description, _ = create_backbone(
            "vit_tiny_patch16_224", 3, weights=str(tmp_path / name)
        )
        assert description == f"file:{(tmp_path / name).resolve()}"
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        assert loaded["head.weight"].shape == (3, 192)  # new head for 3 classes
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"x": evil}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        create_backbone("vit_tiny_patch16_224", 3, weights=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    arch = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.raises(ValueError, match="need weights='random'"):
        create_backbone(
            "vit_tiny_patch16_224",
            3,
            weights=str(tmp_path / "w.safetensors"),
            image_size=16,
            overrides=arch,
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", 3, weights=str(tmp_path / "missing.pth"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        create_backbone("vit_tiny_patch16_224", 3, weights="hf-cache", image_size=16)
    with pytest.warns(RuntimeWarning, match="random initialisation"):
        _, description, _ = create_backbone(
            "vit_tiny_patch16_224", 3, weights="auto", image_size=16
        )
    assert description.startswith("random")
    # A model in the Hugging Face cache layout is found without any network access.
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    cache = tmp_path / "empty-hf" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("abc123")
    (cache / "snapshots" / "abc123").mkdir(parents=True)
    save_file(state, str(cache / "snapshots" / "abc123" / "model.safetensors"))
    model, description, _ = create_backbone("vit_tiny_patch16_224", 3, weights="hf-cache")
    assert description.startswith("hf-cache:") and description.endswith("model.safetensors")
    assert torch.equal(
        model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"]
    )


def test_cli_help_is_light_and_documents_options():
    from livar_merge.federated.cli import build_parser

    code = "from livar_merge.federated.cli import build_parser; build_parser().format_help()"
    assert fresh_imports(code, ["torch"]) == []
    text = build_parser().format_help()
    assert "--lora-merge" in text and "--sigma-pass" in text


def test_cli_end_to_end_and_errors(tmp_path):
    from livar_merge.federated.cli import main

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
    with pytest.raises(ValueError, match="ccvr_rounds must be one of"):
        tiny(ccvr_rounds="first")
    # an option added later leaves the hash of older runs (at its default) unchanged
    body = {k: v for k, v in tiny().to_dict().items() if k != "ccvr_rounds"}
    assert resolve_config(None, None, body).config_hash() == tiny().config_hash()
    assert tiny().config_hash() != tiny(ccvr_rounds="last").config_hash()
