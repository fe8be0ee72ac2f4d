"""The Deployment Engine on loopback under faults (helpers in :mod:`tests.integration.faults`):
a SuperNode killed mid-round and restarted, then the ServerApp killed between rounds and the
run resumed from its folder, in one deployment. ``benchmarks/flower_faults.py`` runs each fault
alone against a fault-free run, and the late reply (a node stopped past the round timeout,
whose timeout depends on the machine's speed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytestmark = [
    pytest.mark.usefixtures("task_identity"),  # messages need a running task's identity
    pytest.mark.slow,
    pytest.mark.skipif(
        os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
    ),
]

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tests.helpers import REPO, assert_accuracies_match, load_checkpoint  # noqa: E402
from tests.integration import faults  # noqa: E402
from tests.integration.deployment import TOOLS  # noqa: E402


@pytest.fixture(autouse=True)
def flower_tools():
    if not all(shutil.which(t) for t in TOOLS):
        pytest.skip("flwr command-line tools not installed")
    if "[tool.flwr.app]" not in (REPO / "pyproject.toml").read_text():
        pytest.skip("not a source checkout with the Flower App config")


def test_a_killed_supernode_restarts_and_a_killed_serverapp_resumes(tmp_path, inprocess_run):
    """One deployment, two faults. Round 2: SuperNode 2 killed while it trains and restarted
    (new ID, same partition); the round goes on without it (flwr's error reply once its
    heartbeat expires). After round 2's checkpoint the ServerApp is killed and ``flwr run ...
    resume=true`` continues on the same SuperNodes: round 3 has every client, the restarted
    node sent the full weights. Round 1 is the in-process run's; round 3 is what the in-process
    engine computes when it resumes a copy of the folder as it was at the kill."""
    import json
    import os
    import signal

    from livar_merge.engines.inprocess import run_federated
    from livar_merge.federated.config import resolve_config
    from tests.integration.deployment import Loopback

    out = tmp_path / "results"
    copy = tmp_path / "at-the-kill"
    with Loopback(tmp_path / "deployment") as deployment:
        f = faults.Federation(deployment).start()
        f.run(out, 3)
        f.training_round_two(out, "node2")
        killed = deployment.node_id("node2")
        deployment.kill("node2")
        f.start_node(2, "node2-restarted")
        faults.wait_rounds(deployment, out, 2, timeout=400)
        for pid in f.processes("flwr-serverapp"):
            os.kill(pid, signal.SIGKILL)
        deployment.wait_for(lambda: f.processes("flwr-serverapp") == [], 30, "the ServerApp to die")
        assert faults.completed_rounds(out) == 2 and not (out / "summary.json").exists()
        shutil.copytree(out, copy)
        f.run(out, 3, "resume=true")
        deployment.wait_for(lambda: (out / "summary.json").is_file(), 400, "the run to finish")
        restarted = deployment.node_id("node2-restarted")
        f.mark("done")
    assert deployment.all_gone(), "processes started by the test are still running"
    print(f"SuperNode killed + restarted, ServerApp killed + resumed, 3 rounds: {f.timeline}")

    result = faults.record(out, None)
    assert result["completed_rounds"] == 3 and result["resumed_after"] == [2]
    clients = ["client_0", "client_1", "client_2"]
    one, two, three = result["rounds"]
    assert one["accepted"] == clients and not one["dropped"]
    assert two["accepted"] == clients[:2]
    assert [d["node_id"] for d in two["dropped"]] == [killed]
    assert "error reply" in two["dropped"][0]["reason"]
    assert three["accepted"] == clients and not three["dropped"]
    assert json.loads((out / "summary.json").read_text())["engine"] == "flower"
    # the resumed run is new to every node: each is sent the full weights once
    assert (
        three["download_mb"]["client_2"]
        == three["download_mb"]["client_0"]
        == one["download_mb"]["client_0"]
    )
    round_three = pd.read_csv(out / "clients.csv").query("round == 3")
    assert round_three.set_index("client").loc["client_2", "node_id"] == restarted

    _, reference = inprocess_run
    assert_accuracies_match(
        result["accuracy_per_round"][:1], reference["accuracy_per_round"][:1], 200
    )
    config = resolve_config("tiny", None, {"rounds": 3})
    inprocess = run_federated(config, copy, resume=True)
    assert inprocess["resumed_after"] == [2]
    got, expected = load_checkpoint(out), load_checkpoint(copy)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    assert_accuracies_match(result["accuracy_per_round"], inprocess["accuracy_per_round"], 200)
