"""The Deployment Engine on loopback: a SuperLink, three SuperNodes, `flwr run`, one SuperNode
killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from tests.helpers import REPO, assert_accuracies_match  # noqa: E402
from tests.integration.deployment import TOOLS, Loopback, free_ports, port_open  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
)
def test_deployment_engine_on_loopback_survives_a_killed_supernode(tmp_path, inprocess_run):
    if not all(shutil.which(t) for t in TOOLS):
        pytest.skip("flwr command-line tools not installed")
    if "[tool.flwr.app]" not in (REPO / "pyproject.toml").read_text():
        pytest.skip("not a source checkout with the Flower App config")
    out = tmp_path / "results"
    link_port, *node_ports = free_ports(4)
    begin = time.perf_counter()
    with Loopback(tmp_path) as deployment:
        deployment.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                       "--port", str(link_port)])  # fmt: skip
        deployment.wait_for(lambda: port_open(link_port), 60, "the SuperLink to listen")
        for m, port in enumerate(node_ports):
            deployment.start(
                f"node{m}",
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(port),
                 "--node-config", f"partition-id={m} num-partitions=3"],
            )  # fmt: skip
        deployment.wait_for(
            lambda: all("SuperNode ID" in deployment.log(f"node{m}") for m in range(3)),
            90,
            "three SuperNodes to connect",
        )
        deployment.cli_config("livar-test", f"127.0.0.1:{link_port}", root_certificates=None)
        deployment.run_app(
            "livar-test",
            f"preset='tiny' rounds=2 out='{out}' min-replies=2 node-wait-timeout=5.0",
        )
        metrics = out / "metrics.csv"
        deployment.wait_for(
            lambda: metrics.is_file() and len(pd.read_csv(metrics)) >= 1, 240, "round 1 to finish"
        )
        killed_id = deployment.node_id("node2")
        deployment.kill("node2")  # crash a SuperNode (and its ClientApps)
        deployment.wait_for(lambda: (out / "summary.json").is_file(), 240, "the run to finish")
    seconds = time.perf_counter() - begin
    print(f"Deployment Engine, 3 SuperNodes x 2 rounds, one killed: {seconds:.1f} s")
    assert deployment.all_gone(), "processes started by the test are still running"
    assert all(not port_open(p) for p in (link_port, *node_ports))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_rounds"] == 2
    rows = pd.read_csv(out / "metrics.csv")
    assert rows["replies_accepted"].tolist() == [3, 2]
    assert rows["replies_dropped"].tolist() == [0, 1]
    replies = pd.read_csv(out / "replies.csv")
    dropped = replies[~replies["accepted"]]
    assert dropped["round"].tolist() == [2] and dropped["node_id"].tolist() == [killed_id]
    assert "error reply" in dropped["reason"].iloc[0]
    accepted = replies[replies["accepted"] & (replies["round"] == 2)]
    assert sorted(accepted["client"]) == ["client_0", "client_1"]
    # Round 1 had all three clients: the same computation as the in-process run.
    _, reference = inprocess_run
    assert_accuracies_match(
        summary["accuracy_per_round"][:1], reference["accuracy_per_round"][:1], 200
    )
