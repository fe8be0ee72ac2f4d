"""The Deployment Engine on loopback: a SuperLink, three SuperNodes, `flwr run`, one SuperNode
killed mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from tests.helpers import REPO, assert_accuracies_match  # noqa: E402

# ------------------------------------------------------------------ Deployment Engine
MARK = "LIVAR_FLOWER_TEST_MARK"


def marked_processes(token: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``MARK=token``."""
    needle = f"{MARK}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(condition, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
        for p in sorted(logs.glob("*.log"))
    )
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
)
def test_deployment_engine_on_loopback_survives_a_killed_supernode(tmp_path, inprocess_run):
    if not all(shutil.which(t) for t in ("flower-superlink", "flower-supernode", "flwr")):
        pytest.skip("flwr command-line tools not installed")
    if "[tool.flwr.app]" not in (REPO / "pyproject.toml").read_text():
        pytest.skip("not a source checkout with the Flower App config")
    token = uuid.uuid4().hex
    env = {**os.environ, MARK: token, "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "results"
    link_port, *node_ports = free_ports(4)
    started: list[tuple[subprocess.Popen, object]] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        home = tmp_path / f"home-{name}"
        home.mkdir()
        log = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            command,
            env={**env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,  # own process group, killed as a whole
        )
        started.append((proc, log))
        return proc

    begin = time.perf_counter()
    try:
        start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                            "--port", str(link_port)])  # fmt: skip
        wait_for(lambda: port_open(link_port), 60, "the SuperLink to listen", logs)
        nodes = [
            start(
                f"node{m}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={m} num-partitions=3",
                ],
            )
            for m, port in enumerate(node_ports)
        ]
        node_logs = [logs / f"node{m}.log" for m in range(3)]
        wait_for(
            lambda: all("SuperNode ID" in p.read_text(errors="replace") for p in node_logs),
            90,
            "three SuperNodes to connect",
            logs,
        )
        cli_home = tmp_path / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "livar-test"\n\n'
            f'[superlink.livar-test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        submitted = subprocess.run(
            ["flwr", "run", str(REPO), "livar-test", "--format", "json", "--run-config",
             f"preset='tiny' rounds=2 out='{out}' min-replies=2 node-wait-timeout=5.0"],
            env={**env, "FLWR_HOME": str(cli_home)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert json.loads(submitted.stdout)["success"] is True
        metrics = out / "metrics.csv"
        wait_for(
            lambda: metrics.is_file() and len(pd.read_csv(metrics)) >= 1,
            240,
            "round 1 to finish",
            logs,
        )
        killed_id = int(node_logs[2].read_text().split("SuperNode ID:")[1].split()[0])
        os.killpg(nodes[2].pid, signal.SIGKILL)  # crash a SuperNode (and its ClientApps)
        nodes[2].wait(timeout=30)
        wait_for(lambda: (out / "summary.json").is_file(), 240, "the run to finish", logs)
    finally:
        for proc, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc, log in started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                proc.wait(timeout=30)
            log.close()  # type: ignore[attr-defined]
        for pid in marked_processes(token):  # children that left the process groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.2)
    seconds = time.perf_counter() - begin
    print(f"Deployment Engine, 3 SuperNodes x 2 rounds, one killed: {seconds:.1f} s")
    assert marked_processes(token) == [], "processes started by the test are still running"
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
