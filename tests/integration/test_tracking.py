"""``--track tensorboard mlflow``: the records read back with each tracker's own reader
(TensorBoard's EventAccumulator, MlflowClient on the folder's SQLite store) and compared with
the run folder's tables, computed again here with pandas; a stopped and resumed run continues
the same tracker runs and logs every round once; a crashed session's extra events are purged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import percentileofscore

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from livar_merge.apps.fed_cli import main
from livar_merge.errors import ConfigError
from livar_merge.federated.run_folder import RunRows
from livar_merge.tracking import STATE_FILE, Trackers, check_trackers
from livar_merge.tracking.sinks.mlflow_sink import folder_store


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def tensorboard_histograms(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    events.Reload()
    return {
        t: [(e.step, e.histogram_value.num) for e in events.Histograms(t)]
        for t in events.Tags()["histograms"]
    }


def expected_scalars(out: Path) -> dict[str, dict[int, float]]:
    """Tag -> {round: value} from the folder's CSVs, computed independently with pandas."""
    expected: dict[str, dict[int, float]] = {}

    def put(tag: str, r: int, value: float) -> None:
        expected.setdefault(tag, {})[int(r)] = float(value)

    metrics = pd.read_csv(out / "metrics.csv")
    for _, row in metrics.iterrows():
        for column in ("test_accuracy", "test_loss", "train_seconds", "uncovered_classes"):
            put(f"round/{column}", row["round"], row[column])
    clients = pd.read_csv(out / "clients.csv")
    for _, row in clients.iterrows():
        for column in ("train_loss", "train_accuracy", "num_samples", "upload_bytes", "steps"):
            put(f"client/{row['client']}/{column}", row["round"], row[column])
    alpha = pd.read_csv(out / "alpha.csv")
    means = alpha.groupby(["round", "client"])[["weight", "omega_a", "bin_b"]].mean()
    for (r, client), row in means.iterrows():
        for column in ("weight", "omega_a", "bin_b"):
            put(f"client/{client}/{column}_mean", r, row[column])
    for r, rows in alpha.groupby("round"):  # percentile ranks in the round's pool, with scipy
        pooled = rows["omega_b"].to_numpy()
        ranks = [percentileofscore(pooled, v, kind="weak") for v in pooled]
        for client, value in rows.assign(rank=ranks).groupby("client")["rank"].mean().items():
            put(f"client/{client}/omega_b_pct_mean", r, value)
    heads = pd.read_csv(out / "head_weights.csv")
    spread = heads.groupby(["round", "class"])["weight"].agg(lambda w: w.max() - w.min())
    for r, value in spread.groupby(level="round").mean().items():
        put("head/weight_spread", r, value)
    return expected


@pytest.mark.slow
def test_a_stopped_and_resumed_run_is_mirrored_once_in_both_trackers(tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--track", "tensorboard", "mlflow", "--out", str(out)]
    assert main([*args, "--stop-after", "1"]) == 0
    first = json.loads((out / STATE_FILE).read_text())["trackers"]
    assert first["mlflow"]["last_step"] == first["tensorboard"]["last_step"] == 1
    assert main([*args, "--resume"]) == 0
    state = json.loads((out / STATE_FILE).read_text())["trackers"]
    run_id = state["mlflow"]["state"]["run_id"]
    assert run_id == first["mlflow"]["state"]["run_id"]  # the same MLflow run continued
    expected = expected_scalars(out)

    client = MlflowClient(tracking_uri=folder_store(out))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "synthetic-livar-b0.5-s42"
    assert run.data.params["method"] == "livar" and run.data.params["rounds"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for tag, per_round in expected.items():
        history = client.get_metric_history(run_id, tag)
        assert sorted(m.step for m in history) == sorted(per_round), tag  # each round once
        for m in history:
            assert m.value == pytest.approx(per_round[m.step], rel=1e-12, abs=1e-12), tag
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "metrics.csv", "clients.csv", "alpha.csv", "summary.md"} <= artifacts

    scalars = tensorboard_scalars(out / "tensorboard")
    for tag, per_round in expected.items():
        assert [s for s, _ in scalars[tag]] == sorted(per_round), tag
        got = np.array([v for _, v in scalars[tag]])
        want = np.array([per_round[s] for s, _ in scalars[tag]], dtype=np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=tag)  # float32 events
    histograms = tensorboard_histograms(out / "tensorboard")
    layers = pd.read_csv(out / "alpha.csv").groupby(["client", "round"]).size()
    for (client_id, r), count in layers.items():
        assert (r, count) in histograms[f"client/{client_id}/alpha"]


def test_a_crashed_sessions_events_are_purged_and_logged_once(tmp_path):
    """A session that logged round 2 but died before recording it: the resumed trackers drop
    its TensorBoard events (purge_step) and log round 2 once with the folder's values."""
    rows = RunRows()
    for r, accuracy in ((1, 0.25), (2, 0.5)):
        rows.metrics.append({"round": r, "test_accuracy": accuracy})
    one = RunRows(metrics=rows.metrics[:1])
    trackers = Trackers(tmp_path, ["tensorboard"], title="t", params={"a": 1}, resume=False)
    trackers.log_rounds(one)
    crashed = trackers.trackers["tensorboard"]
    crashed.scalars(2, {"round/test_accuracy": 0.99})  # logged, then the process died
    crashed.flush()
    resumed = Trackers(tmp_path, ["tensorboard"], title="t", params={"a": 1}, resume=True)
    resumed.log_rounds(rows)
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["round/test_accuracy"] == [
        (1, 0.25),
        (2, 0.5),
    ]
    fresh = Trackers(tmp_path / "x", ["tensorboard"], title="t", params={}, resume=True)
    assert fresh.last_step == {"tensorboard": 0}  # resume=True on a folder without trackers


def test_tracker_options_are_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandb'; available: \['mlflow'"):
        check_trackers(["wandb"])
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        check_trackers(["mlflow", "mlflow"])

    def missing(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    with pytest.raises(ConfigError, match=r"'mlflow' needs the 'mlflow' package.*livar\[track\]"):
        check_trackers(["mlflow"], importer=missing)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--track", "nope", "--out", str(out)])
    assert "unknown tracker 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_round_scalars_on_hand_made_rows():
    """Worked by hand: two clients, two layers, three classes; names sanitised (``+``)."""
    from livar_merge.tracking.records import round_histograms, round_scalars

    rows = RunRows(
        metrics=[{"round": 1, "test_accuracy": 0.5, "participants": "a b"}],
        paired=[{"round": 1, "method": "livar+ccvr", "test_accuracy": 0.6, "difference": 0.1}],
        clients=[{"round": 1, "client": "a", "train_loss": 2.0, "node_id": 7}],
        alpha=[
            {"round": 1, "client": "a", "layer": "l0", "weight": 0.2, "bin_a": 0, "omega_a": 1.0},
            {"round": 1, "client": "a", "layer": "l1", "weight": 0.6, "bin_a": 2, "omega_a": 3.0},
            {"round": 1, "client": "b", "layer": "l0", "weight": 0.8, "bin_a": 1, "omega_a": 2.0},
            {"round": 2, "client": "b", "layer": "l0", "weight": 9.0, "bin_a": 1},
        ],
        head_weights=[
            {"round": 1, "client": "a", "class": 0, "weight": 0.7},
            {"round": 1, "client": "b", "class": 0, "weight": 0.3},  # spread 0.4
            {"round": 1, "client": "a", "class": 1, "weight": 0.5},
            {"round": 1, "client": "b", "class": 1, "weight": 0.5},  # spread 0
            {"round": 1, "client": "a", "class": 2, "weight": 1.0},
            {"round": 1, "client": "b", "class": 2, "weight": 0.0},  # spread 1
        ],
        replies=[{"round": 1, "client": "a", "accepted": True, "download_bytes": 100}],
    )
    assert round_scalars(rows, 1) == pytest.approx(
        {
            "round/test_accuracy": 0.5,
            "paired/livar_ccvr/test_accuracy": 0.6,
            "paired/livar_ccvr/difference": 0.1,
            "client/a/train_loss": 2.0,
            "client/a/download_bytes": 100.0,
            "client/a/weight_mean": 0.4,
            "client/a/bin_a_mean": 1.0,
            "client/a/omega_a_mean": 2.0,
            "client/b/weight_mean": 0.8,
            "client/b/bin_a_mean": 1.0,
            "client/b/omega_a_mean": 2.0,
            # omega_a pool {1, 2, 3} (a: layers 1 and 3, b: 2): percentiles 100/3, 100, 200/3
            "client/a/omega_a_pct_mean": (100 / 3 + 100) / 2,
            "client/b/omega_a_pct_mean": 200 / 3,
            "head/weight_spread": (0.4 + 0.0 + 1.0) / 3,
        }
    )
    histograms = round_histograms(rows, 1)
    assert sorted(histograms) == ["client/a/alpha", "client/b/alpha"]
    np.testing.assert_array_equal(histograms["client/a/alpha"], [0.2, 0.6])
