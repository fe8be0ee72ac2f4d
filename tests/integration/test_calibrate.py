"""End-to-end tests of ``livar-calibrate`` on tiny proxies (the numerical core is tested in
tests/unit/calib/)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from livar_calib.cli import main
from livar_merge import GShapTable


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "run"
    track = ["--track", "tensorboard", "mlflow"] if _trackers_installed() else []
    assert main(["--preset", "tiny", "--out", str(out), *track]) == 0
    return out


def _trackers_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("tensorboard", "mlflow"))


def test_the_calibration_is_mirrored_in_the_trackers(calibrated):
    """Stage timings, forest R^2, SHAP trends and quality numbers of summary.json, the table
    and the verdict, read back with MlflowClient and TensorBoard's EventAccumulator."""
    if not _trackers_installed():
        pytest.skip("the track extra is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from livar_merge.tracking.sinks.mlflow_sink import folder_store

    summary = json.loads((calibrated / "summary.json").read_text())
    state = json.loads((calibrated / "trackers.json").read_text())["trackers"]
    client = MlflowClient(tracking_uri=folder_store(calibrated))
    run = client.get_run(state["mlflow"]["state"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["proxy"] == "synthetic"
    metrics = run.data.metrics
    for stage, seconds in summary["timings_seconds"].items():
        assert metrics[f"calibration/seconds/{stage}"] == pytest.approx(seconds, rel=1e-12)
    for feature, rho in summary["shap_trend_spearman"].items():
        assert metrics[f"calibration/shap_trend/{feature}"] == pytest.approx(rho, rel=1e-12)
    compared = 0
    for features, values in summary["forest_metrics"].items():  # "q_a,q_b": "," is not a tag
        for name, value in values.items():
            key = f"calibration/forest/{features.replace(',', '_')}/{name}"
            if value == value:  # NaN (too few runs for an interval) is not logged
                assert metrics[key] == pytest.approx(value, rel=1e-12), key
                compared += 1
            else:
                assert key not in metrics
    assert compared >= 10
    mean = summary["quality_summary"]["calibrated"]["mean"]
    assert metrics["calibration/quality/calibrated/mean"] == pytest.approx(mean, rel=1e-12)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "quality_verdict.md", "table.md", "figure2.png"} <= artifacts
    verdict = client.download_artifacts(run.info.run_id, "quality_verdict.md")
    assert Path(verdict).read_text() == summary["quality_verdict"]
    events = EventAccumulator(str(calibrated / "tensorboard"))
    events.Reload()
    assert "calibration/shap_trend/q_a" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("calibration/shap_trend/q_a")] == [1]


def test_run_folder_and_table(calibrated):
    out = calibrated
    summary = json.loads((out / "summary.json").read_text())
    table = GShapTable.load(summary["table"])
    assert table.shape == (3, 3) and table.name == "synthetic-vit_tiny_patch16_224"
    assert table.provenance["proxy_dataset"] == "synthetic"
    saved = json.loads((out / "config.json").read_text())
    assert table.provenance["config_hash"] == saved["config_hash"]
    assert "discretisation" in table.provenance
    rows = pd.read_csv(out / "rows.csv")
    # 1 beta x 2 seeds x 1 round = 2 repeats of 3 clients x 8 layers
    assert len(rows) == 2 * 3 * 8 and rows["repeat_id"].nunique() == 2
    assert {"omega_a", "omega_b", "num_samples", "lam", "q_a", "q_b"} <= set(rows.columns)
    assert (rows["lam"] >= 0).all() and rows["q_a"].between(0, 100).all()
    for name in (
        "forest.skops",
        "forest.json",
        "shap_values.csv",
        "shap.json",
        "quality.csv",
        "quality_summary.csv",
        "figures/figure2.png",
        "figures/figure2.pdf",
        "figures/figureA.png",
        "provenance.json",
    ):
        assert (out / name).is_file(), name
    quality = pd.read_csv(out / "quality_summary.csv", index_col=0)
    assert {"calibrated", "paper-table-a", "fedavg", "nnls-oracle"} <= set(quality.index)
    assert quality.loc["nnls-oracle", "mean"] <= quality["mean"].min() + 1e-12


def test_table_drives_a_federated_run(calibrated, tmp_path):
    from livar_merge.apps.fed_cli import main as fed_main

    table = json.loads((calibrated / "summary.json").read_text())["table"]
    assert (
        fed_main(
            ["--preset", "tiny", "--rounds", "1", "--table", table, "--out", str(tmp_path / "fed")]
        )
        == 0
    )
    prov = json.loads((tmp_path / "fed/provenance.json").read_text())
    assert prov["table"]["name"] == "synthetic-vit_tiny_patch16_224"


def test_interrupted_run_resumes_to_the_same_table(calibrated, tmp_path, monkeypatch):
    import livar_calib.proxy as client_module  # the proxy trainer's train_client

    out = tmp_path / "run"
    real = client_module.train_client
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # run b0.5-s1 (4 trainees a round), after client_0 and client_1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_client", crashing)
    with pytest.raises(KeyboardInterrupt):
        main(["--preset", "tiny", "--out", str(out)])
    partial = out / "proxy/b0.5-s1/round_1_partial"
    assert sorted(p.name for p in partial.iterdir()) == [
        "client_0.safetensors",
        "client_1.safetensors",
    ]
    monkeypatch.setattr(client_module, "train_client", real)
    assert main(["--preset", "tiny", "--out", str(out)]) == 2  # refuses without --resume
    assert main(["--preset", "tiny", "--out", str(out), "--resume"]) == 0
    ours = GShapTable.load(json.loads((out / "summary.json").read_text())["table"])
    reference = GShapTable.load(json.loads((calibrated / "summary.json").read_text())["table"])
    np.testing.assert_array_equal(ours.values, reference.values)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "rows.csv"), pd.read_csv(calibrated / "rows.csv")
    )
    assert not partial.exists()


def test_tiny_imagenet_original_layout_and_publish(tmp_path):
    from tests.helpers import write_tiny_folder

    write_tiny_folder(tmp_path / "data", per_class=24, val_per_class=2)
    out = tmp_path / "run"
    publish = tmp_path / "gshap"
    args = [
        "--preset",
        "tiny",
        "--proxy",
        "tiny-imagenet",
        "--data-root",
        str(tmp_path / "data"),
        "--max-train",
        "none",
        "--min-client-samples",
        "5",
        "--out",
        str(out),
        "--publish",
        str(publish),
        "--rounds",
        "1",
    ]
    assert main(args) == 0
    published = sorted(p.name for p in publish.iterdir())
    assert published == ["tiny-imagenet-vit_tiny_patch16_224.v1.json"]
    assert main([*args, "--resume"]) == 0  # same table: not published twice
    assert sorted(p.name for p in publish.iterdir()) == published
    table = GShapTable.load(publish / published[0])
    assert table.provenance["proxy_dataset"] == "tiny-imagenet"
    rows = pd.read_csv(out / "rows.csv")
    assert rows["num_samples"].groupby(rows["client"]).first().sum() == 72


def test_unknown_proxy_and_bad_weights_leave_the_folder_clean(tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:  # a usage error: the name is checked in validation
        main(["--preset", "tiny", "--proxy", "nope", "--out", str(out)])
    assert exc.value.code == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err and not out.exists()
    args = ["--preset", "tiny", "--weights", "dinov2-s14-imgfocus", "--out", str(out)]
    assert main(args) == 2  # the tiny preset's vit_tiny model cannot take these weights
    assert "vit_small_patch14_dinov2" in capsys.readouterr().err and not out.exists()
    assert main(["--preset", "tiny", "--out", str(out), "--resume", "--seeds", "0"]) == 0
    # a single run: nothing can be held out, and the report says it scored in-sample
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "in-sample" and summary["held_out_runs"] == []
    assert summary["quality_verdict"].startswith("in-sample (no held-out runs")
    assert summary["downstream"]["verdict"].startswith("in-sample (no held-out runs")


def test_quality_gap_downstream_and_verdict(calibrated):
    """The informative report: scaled errors and gap_closed (FedAvg 0, oracle 1), the
    downstream accuracies of every scheme on the same client updates, the verdict sentence."""
    out = calibrated
    quality = pd.read_csv(out / "quality_summary.csv", index_col=0)
    assert quality.loc["fedavg", "gap_closed"] == 0.0
    assert quality.loc["nnls-oracle", "gap_closed"] == 1.0
    report = pd.read_csv(out / "quality.csv")
    assert (report["scaled_error"] <= report["relative_error"] + 1e-12).all()
    summary = json.loads((out / "summary.json").read_text())
    # 2 runs, 1 held out: whole runs are the unit, and one is too few for a verdict
    assert summary["resampling_unit"] == "run" and summary["evaluation"] == "held-out"
    assert len(summary["held_out_runs"]) == 1 and summary["min_held_out_runs_for_an_interval"] == 3
    verdict = summary["quality_verdict"]
    assert verdict.startswith("calibrated cannot be compared with (too few held-out runs")
    assert "fedavg" in verdict and "beats" not in verdict and "worse" not in verdict
    assert np.isnan(quality.loc["calibrated", "gap_low"])
    assert "too few held-out runs for an interval" in summary["downstream"]["verdict"]
    machine = summary["machine"]
    assert machine["gflops_fp32"] > 0 and machine["train_images_per_second"] > 0
    assert machine["proxy_training"]["image_passes"] == 2 * 2 * 300 * 1  # runs x 2 x images
    forest = json.loads((out / "forest.json").read_text())
    assert forest["test_runs"] == summary["held_out_runs"] and forest["resampling_unit"] == "run"
    downstream = pd.read_csv(out / "downstream.csv")
    assert set(downstream["scheme"]) == {
        "calibrated",
        "paper-table-a",
        "fedavg",
        "nnls-oracle",
        "joint",
    }
    assert (downstream.loc[downstream["scheme"] == "fedavg", "difference"] == 0).all()
    assert downstream["test_accuracy"].between(0, 1).all()
    assert "vs FedAvg" in summary["downstream"]["verdict"]


def _round_start_error(got: dict, trained: dict, w0: dict, names) -> tuple[float, float]:
    """Max over ``names`` of ``|got - trained|`` and of ``|trained - W0|`` (float64): how far a
    rebuilt round start is from the state the proxy training had, and how far that state has
    moved from the seeded backbone (the signal the comparison must resolve)."""
    error = max(float((got[n].double() - trained[n].double()).abs().max()) for n in names)
    moved = max(float((trained[n].double() - w0[n].double()).abs().max()) for n in names)
    return error, moved


@pytest.mark.parametrize("next_start", ["joint", "fedavg"])
def test_round_starts_rebuild_every_round_start_of_the_proxy_training(
    tmp_path, monkeypatch, next_start
):
    """``round_starts`` rebuilds each proxy round's start (frozen weights of the LoRA layers and
    head) from the saved factors and heads. Compared, round by round and for both
    ``next_start`` rules, with the state the trainer itself held as each round began (recorded
    during the training) and with its ``state.safetensors`` after the last round; the weights
    of the other rule must be visibly farther off, so the comparison can tell them apart."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from livar_calib.config import CALIB_PRESETS, CalibConfig
    from livar_calib.downstream import round_starts
    from livar_calib.proxy import ProxyTrainer, proxy_runs
    from livar_merge.federated.federation import build_federation

    config = CalibConfig(**{**CALIB_PRESETS["tiny"], "next_start": next_start, "rounds": 2})
    run = proxy_runs(config)[0]
    folder = tmp_path / run.run_id
    trained: dict[int, dict] = {}  # round -> the trainer's state as the round began (copies)
    real_round = ProxyTrainer.run_round

    def recording_round(self, round_index):
        trained[round_index] = {k: v.clone() for k, v in self._state_tensors().items()}
        return real_round(self, round_index)

    monkeypatch.setattr(ProxyTrainer, "run_round", recording_round)
    assert list(ProxyTrainer(config, run, folder).rounds()) == [1, 2]
    trained[3] = load_file(str(folder / "state.safetensors"))  # after the last round's fold
    assert trained.keys() == {1, 2, 3}
    names = sorted(trained[1])
    weights = [n for n in names if ".base_layer.weight" in n]
    heads = [n for n in names if "modules_to_save" in n]
    assert weights and heads

    def rebuilt_starts(rule: str):
        fed = build_federation(config, dataset=config.proxy, seed=run.seed, beta=run.beta)
        params = dict(fed.model.named_parameters())
        w0 = {n: params[n].detach().clone() for n in names}
        states = {}
        chosen = dataclasses.replace(config, next_start=rule)
        for start in round_starts(chosen, folder, fed.model, config.rounds):
            state = {n: params[n].detach().clone() for n in names}
            for n in weights:  # the start's own record of the frozen weights: the model's
                layer = n.removesuffix(".base_layer.weight")
                assert torch.equal(start.base[layer], state[n]), n
            expected_n = [len(part) for part in fed.parts]
            np.testing.assert_array_equal(start.n, expected_n)
            states[start.round] = state
        states[config.rounds + 1] = {n: params[n].detach().clone() for n in names}
        return w0, states

    w0, ours = rebuilt_starts(next_start)
    _, theirs = rebuilt_starts("fedavg" if next_start == "joint" else "joint")
    assert sorted(ours) == [1, 2, 3]
    for n in names:  # round 1 starts from the seeded model, identically in both
        assert torch.equal(trained[1][n], w0[n]) and torch.equal(ours[1][n], w0[n]), n
    for r in (2, 3):
        for group in (weights, heads):
            error, moved = _round_start_error(ours[r], trained[r], w0, group)
            other, _ = _round_start_error(theirs[r], trained[r], w0, group)
            # float32 training fold vs the rebuild from float64 factors: rounding only
            tolerance = 1e-5 * moved + 1e-6
            assert moved > 100 * tolerance, (r, moved)  # the rounds changed the start
            assert error <= tolerance, (next_start, r, error, tolerance)
            assert other > 100 * tolerance, (next_start, r, other)  # the other rule differs


def test_resume_with_another_discretisation_reruns_only_the_analysis(calibrated, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(calibrated, out)
    proxy_files = sorted((out / "proxy").rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in proxy_files}
    assert (
        main(["--preset", "tiny", "--out", str(out), "--resume", "--discretise", "additive"]) == 0
    )
    assert {p: p.stat().st_mtime_ns for p in proxy_files} == stamps  # no training
    tables = sorted((out / "table").glob("*.json"))
    assert [p.name.rsplit(".", 2)[1] for p in tables] == ["v1", "v2"]
    first, second = (GShapTable.load(p) for p in tables)
    assert first.provenance["discretisation"]["rule_name"] == "cell-mean"
    assert second.provenance["discretisation"]["rule_name"] == "additive"
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["discretise"] == "additive"
    assert saved["previous"][0]["config"]["discretise"] == "cell-mean"
    # the same options again reuse the table; other training options are refused
    assert (
        main(["--preset", "tiny", "--out", str(out), "--resume", "--discretise", "additive"]) == 0
    )
    assert len(list((out / "table").glob("*.json"))) == 2
    assert main(["--preset", "tiny", "--out", str(out), "--resume", "--rounds", "3"]) != 0


def _outputs(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


STAGE_FILES = ["rows.csv", "forest.skops", "forest.json", "shap_values.csv", "shap.json"]
STAGE_FILES += ["quality.csv", "downstream.csv"]


def test_a_resumed_calibration_skips_the_stages_whose_inputs_are_unchanged(
    calibrated, tmp_path, monkeypatch
):
    """The docstring's promise, checked: an unchanged resume computes no stage (their
    functions are made to fail) and rewrites no output; another forest option recomputes the
    forest and everything after it, not the NNLS; a changed output is recomputed."""
    import shutil

    import livar_calib.pipeline as pipeline

    out = tmp_path / "copy"
    shutil.copytree(calibrated, out)
    first = json.loads((out / "summary.json").read_text())
    assert set(first["stages"].values()) == {"computed"}
    before = _outputs(out, STAGE_FILES)

    def fail(*args, **kwargs):
        raise AssertionError("a stage ran although its inputs were unchanged")

    for name in ("collect_rows", "fit_forest", "shap_analysis", "reconstruction_report"):
        monkeypatch.setattr(pipeline, name, fail)
    monkeypatch.setattr(pipeline, "downstream_report", fail)
    assert main(["--preset", "tiny", "--out", str(out), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == dict.fromkeys(
        ["nnls", "forest", "shap", "quality", "downstream"], "reused"
    )
    assert _outputs(out, STAGE_FILES) == before
    for key in ("table_identity", "forest_metrics", "shap_trend_spearman", "quality_summary"):
        assert summary[key] == first[key], key
    assert summary["downstream"] == first["downstream"]
    monkeypatch.undo()

    # a forest option: NNLS reused, the forest and everything downstream of it recomputed
    assert main(["--preset", "tiny", "--out", str(out), "--resume", "--min-samples-leaf", "5"]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["nnls"] == "reused" and stages["forest"] == stages["shap"] == "computed"

    # an output changed by hand is not trusted: its stage runs again and restores it
    rows = (out / "rows.csv").read_text()
    (out / "rows.csv").write_text(rows + "\n")
    assert main(["--preset", "tiny", "--out", str(out), "--resume", "--min-samples-leaf", "5"]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["nnls"] == "computed" and (out / "rows.csv").read_text() == rows


def test_the_calibration_report_renders_in_a_browser(calibrated, tmp_path):
    """livar-report on the calibration: no console message in headless Chromium, the table's
    values with per-cell rows and intervals, the SHAP figure and the verdict drawn."""
    from livar_merge.apps.report.cli import main as report
    from tests.integration.browser import chromium, drawn, embedded_images, render

    if chromium() is None:
        pytest.skip("chromium is not installed")
    page = tmp_path / "calibration.html"
    assert report([str(calibrated), "--out", str(page)]) == 0
    dom, console, shot = render(page, tmp_path / "browser")
    assert console == [] and drawn(shot)
    images = embedded_images(dom)
    assert len(images) >= 3 and all(drawn(image) for image in images)  # table, figure2, figureA
    summary = json.loads((calibrated / "summary.json").read_text())
    assert summary["quality_verdict"].split("\n")[0][:60] in dom.replace("&#x27;", "'")
    for heading in ("The table", "Random forest: R^2", "SHAP curves", "Quality report"):
        assert f">{heading}</h2>" in dom, heading
    r2 = summary["forest_metrics"]["q_a,q_b"]["r2"]
    assert f"{r2:.4g}" in dom
