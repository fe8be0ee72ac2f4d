"""Paired evaluation (--paired): other methods on the same client updates, both engines."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from livar_merge.errors import LivarError
from livar_merge.federated.cli import main
from livar_merge.federated.config import resolve_config
from livar_merge.federated.paired import mean_interval, paired_summary, with_differences
from livar_merge.federated.runner import run_federated


def tiny(**overrides):
    return resolve_config("tiny", None, overrides)


def load_checkpoint(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "global.safetensors"))


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


def test_paired_changes_the_config_hash_only_when_given():
    assert (
        tiny(method="fedavg").config_hash() != tiny(method="fedavg", paired=["livar"]).config_hash()
    )
    plain = tiny(method="fedavg").to_dict()
    plain.pop("paired")
    import hashlib

    ignore = {"out", "progress", "threads", "num_workers", "eval_batch_size", "engine"}
    ignore |= {"client_cpus", "client_gpus"}
    body = {k: v for k, v in plain.items() if k not in ignore and k != "ccvr_rounds"}
    legacy = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert tiny(method="fedavg").config_hash() == legacy  # older run folders keep their hash


@pytest.mark.parametrize(
    ("paired", "message"),
    [
        (["nope"], "unknown"),
        (["fedavg"], "own method"),
        (["livar", "livar"], "twice"),
        (["ccvr"], "moments"),
        (["fedproto"], "prototypes"),
    ],
)
def test_bad_paired_methods_are_refused_before_any_data(paired, message):
    with pytest.raises(LivarError, match=message):
        tiny(method="fedavg", paired=paired)


def test_cli_refuses_a_bad_paired_method_with_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--method", "fedavg", "--paired", "ccvr", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "paired method 'ccvr'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_paired_list_from_a_string_as_in_toml_or_flower_run_config():
    assert tiny(paired="fedavg, livar-sigma").paired == ["fedavg", "livar-sigma"]
    assert tiny(paired="fedavg livar-alpha").paired == ["fedavg", "livar-alpha"]


def test_mean_interval_matches_scipy(rng):
    x = rng.normal(0.02, 0.05, size=9)
    got = mean_interval(x)
    low, high = stats.t.interval(0.95, 8, loc=x.mean(), scale=stats.sem(x))
    assert got["n"] == 9 and got["mean"] == pytest.approx(x.mean())
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    assert mean_interval([0.1])["low"] is None and mean_interval([])["mean"] is None


def test_paired_summary_by_hand():
    rows = with_differences(
        [
            {
                "round": 1,
                "method": "a",
                "test_accuracy": 0.5,
                "aggregation_seconds": 0.1,
                "evaluation_seconds": 1.0,
            },
        ],
        0.4,
    ) + with_differences(
        [
            {
                "round": 2,
                "method": "a",
                "test_accuracy": 0.55,
                "aggregation_seconds": 0.1,
                "evaluation_seconds": 1.0,
            },
        ],
        0.6,
    )
    summary = paired_summary(rows, "own")["methods"]["a"]
    assert summary["final_difference"] == pytest.approx(-0.05)
    assert summary["rounds"]["mean"] == pytest.approx(0.025)
    assert summary["rounds_better"] == 1 and summary["rounds_worse"] == 1
    assert summary["evaluation_seconds"] == pytest.approx(2.0)


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


def test_cpu_preset_is_the_pretrained_backbone_and_cpu_random_the_control():
    cpu, control = resolve_config("cpu"), resolve_config("cpu-random")
    assert (cpu.model, cpu.weights) == ("vit_small_patch14_dinov2", "dinov2-s14-imgfocus")
    assert (control.weights, control.embed_dim) == ("random", 96)


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
