"""Deployment faults on loopback, shared by the tests and ``benchmarks/flower_faults.py``.

A plain (``--insecure``) SuperLink and N SuperNodes run as processes in a :class:`Loopback`;
``flwr run`` submits the LIVAR App. Each scenario injects one real fault with signals (no test
hook in the code under test) and returns what the run folder recorded:

* :func:`supernode_killed_and_restarted`: SIGKILL a SuperNode (and its ClientApp) while it
  trains round 2, start it again (a new node ID, the same partition).
* :func:`serverapp_killed_and_resumed`: SIGKILL the ServerApp process after round ``k``'s
  checkpoint, then ``flwr run ... resume=true`` (a new Flower run, the same SuperNodes).
* :func:`reply_after_round_timeout`: SIGSTOP one node's ClientApp (its SuperNode keeps sending
  heartbeats) past the round timeout, SIGCONT it when the round has closed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tests.helpers import load_checkpoint
from tests.integration.deployment import Loopback, free_ports, marked_processes, port_open

FEDERATION = "livar-faults"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid``'s parent, grandparent, ... (a SuperNode starts a
    SuperExec, which starts the ClientApps)."""
    for _ in range(8):
        pid = parent(pid)
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def completed_rounds(out: Path) -> int:
    """Rounds whose checkpoint is written (``checkpoint/state.json``)."""
    state = out / "checkpoint" / "state.json"
    if not state.is_file():
        return 0
    try:
        return int(json.loads(state.read_text())["completed_rounds"])
    except (ValueError, KeyError):  # being replaced: read again later
        return 0


@dataclass
class Federation:
    """A SuperLink and ``nodes`` SuperNodes (partition m of ``nodes``) in ``deployment``."""

    deployment: Loopback
    nodes: int = 3
    link_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    timeline: list[tuple[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def mark(self, event: str) -> None:
        """Note ``event`` with the seconds since the deployment started."""
        self.timeline.append((event, round(time.perf_counter() - self.t0, 1)))

    def start(self) -> Federation:
        self.link_port, *self.node_ports = free_ports(1 + self.nodes)
        d = self.deployment
        d.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                              "--port", str(self.link_port)])  # fmt: skip
        d.wait_for(lambda: port_open(self.link_port), 60, "the SuperLink to listen")
        for m in range(self.nodes):
            self.start_node(m)
        d.wait_for(
            lambda: all("SuperNode ID" in d.log(f"node{m}") for m in range(self.nodes)),
            90,
            f"{self.nodes} SuperNodes to connect",
        )
        d.cli_config(FEDERATION, f"127.0.0.1:{self.link_port}", root_certificates=None)
        return self

    def start_node(self, m: int, name: str | None = None) -> None:
        self.deployment.start(
            name or f"node{m}",
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
             "--host", "127.0.0.1", "--port", str(self.node_ports[m]),
             "--node-config", f"partition-id={m} num-partitions={self.nodes}"],
        )  # fmt: skip

    def run(self, out: Path, rounds: int, extra: str = "") -> None:
        self.deployment.run_app(
            FEDERATION,
            f"preset='tiny' rounds={rounds} out='{out}' min-replies=2 "
            f"node-wait-timeout=5.0 {extra}".strip(),
        )

    def processes(self, program: str) -> list[int]:
        """Live processes of this deployment running ``program`` (flwr-serverapp, ...)."""
        return [p for p in marked_processes(self.deployment.token) if program in cmdline(p)]

    def clientapps_of(self, name: str) -> list[int]:
        """The ClientApp processes the SuperNode ``name`` started."""
        node_pid = self.deployment.started[name][0].pid
        return [p for p in self.processes("flwr-clientapp") if descends_from(p, node_pid)]

    def training_round_two(self, out: Path, name: str) -> list[int]:
        """Wait until node ``name`` trains round 2; its round-2 ClientApp processes. Every
        ClientApp seen up to round 1's checkpoint is excluded (one may still be exiting)."""
        seen: set[int] = set()

        def round_one_done() -> bool:
            seen.update(self.clientapps_of(name))
            return completed_rounds(out) >= 1

        self.deployment.wait_for(round_one_done, 300, "round 1 to finish")
        self.mark("round 1 done")
        self.deployment.wait_for(
            lambda: bool(set(self.clientapps_of(name)) - seen), 120, f"{name} to train round 2"
        )
        return sorted(set(self.clientapps_of(name)) - seen)


def wait_rounds(deployment: Loopback, out: Path, n: int, timeout: float = 300) -> None:
    deployment.wait_for(lambda: completed_rounds(out) >= n, timeout, f"round {n} to finish")


def record(out: Path, reference: Path | None) -> dict[str, Any]:
    """What the run folder recorded: per round the accepted clients and the dropped replies
    with reasons, the summary's rounds and resumes, and the largest difference of the final
    global tensors from the fault-free ``reference`` folder's."""
    replies = pd.read_csv(out / "replies.csv")
    summary = json.loads((out / "summary.json").read_text())
    rounds = []
    for r, group in replies.groupby("round"):
        ok = group[group["accepted"]]
        bad = group[~group["accepted"]]
        rounds.append(
            {
                "round": int(r),
                "accepted": sorted(str(c) for c in ok["client"]),
                "dropped": [
                    {"node_id": int(row.node_id), "reason": str(row.reason)}
                    for row in bad.itertuples()
                ],
                "download_mb": {
                    str(row.client): round(float(row.download_bytes) / 1e6, 3)
                    for row in ok.itertuples()
                    if pd.notna(row.download_bytes)
                },
                "base_resync": sorted(
                    str(row.client)
                    for row in group.itertuples()
                    if str(row.base_resync) not in ("", "nan")
                ),
            }
        )
    result: dict[str, Any] = {
        "completed_rounds": summary["completed_rounds"],
        "resumed_after": summary.get("resumed_after", []),
        "accuracy_per_round": summary["accuracy_per_round"],
        "rounds": rounds,
    }
    if reference is not None:
        got, expected = load_checkpoint(out), load_checkpoint(reference)
        assert got.keys() == expected.keys()
        result["max_abs_diff_vs_fault_free"] = max(
            float((got[k] - expected[k]).abs().max()) for k in expected
        )
        reference_summary = json.loads((reference / "summary.json").read_text())
        result["fault_free_accuracy_per_round"] = reference_summary["accuracy_per_round"]
    return result


def _timed(scenario: Callable[[Federation, Path], dict[str, Any]], root: Path) -> dict[str, Any]:
    begin = time.perf_counter()
    with Loopback(root) as deployment:
        federation = Federation(deployment).start()
        federation.mark("federation up")
        result = scenario(federation, root / "results")
        federation.mark("run finished")
        result["timeline"] = dict(federation.timeline)
    result["seconds"] = round(time.perf_counter() - begin, 1)
    result["processes_left"] = (
        0 if deployment.all_gone() else len(marked_processes(deployment.token))
    )
    return result


def supernode_killed_and_restarted(
    root: Path, reference: Path | None, rounds: int = 3
) -> dict[str, Any]:
    """Kill node 2 (SuperNode and ClientApp) as soon as it trains round 2, restart it."""

    def scenario(f: Federation, out: Path) -> dict[str, Any]:
        f.run(out, rounds)  # the dead node's reply: an error once its heartbeat expires
        f.training_round_two(out, "node2")
        f.mark("node 2 killed")
        killed = f.deployment.node_id("node2")
        f.deployment.kill("node2")
        f.start_node(2, "node2-restarted")
        wait_rounds(f.deployment, out, 2, timeout=400)
        f.mark("round 2 done")
        f.deployment.wait_for(lambda: (out / "summary.json").is_file(), 400, "the run to finish")
        return {"fault": "SuperNode killed while training round 2, restarted",
                "killed_node_id": killed,
                "restarted_node_id": f.deployment.node_id("node2-restarted"),
                **record(out, reference)}  # fmt: skip

    return _timed(scenario, root)


def serverapp_killed_and_resumed(
    root: Path, reference: Path | None, rounds: int = 3, after: int = 1
) -> dict[str, Any]:
    """Kill the ServerApp once round ``after`` is checkpointed; resume the run from its folder."""

    def scenario(f: Federation, out: Path) -> dict[str, Any]:
        f.run(out, rounds)
        wait_rounds(f.deployment, out, after)
        f.mark(f"round {after} done, ServerApp killed")
        servers = f.processes("flwr-serverapp")
        assert servers, "no ServerApp process found"
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        f.deployment.wait_for(
            lambda: f.processes("flwr-serverapp") == [], 30, "the ServerApp to die"
        )
        assert completed_rounds(out) == after and not (out / "summary.json").exists()
        f.run(out, rounds, "resume=true")
        f.mark("resumed run submitted")
        wait_rounds(f.deployment, out, after + 1, timeout=400)
        f.mark(f"round {after + 1} done")
        f.deployment.wait_for(lambda: (out / "summary.json").is_file(), 400, "the run to finish")
        return {"fault": f"ServerApp killed after round {after}, run resumed from its folder",
                **record(out, reference)}  # fmt: skip

    return _timed(scenario, root)


def reply_after_round_timeout(
    root: Path, reference: Path | None, rounds: int = 3, timeout: float = 30.0
) -> dict[str, Any]:
    """Stop node 1's ClientApp while it trains round 2 until the round has closed without it,
    then let it finish and reply late."""

    def scenario(f: Federation, out: Path) -> dict[str, Any]:
        f.run(out, rounds, f"round-timeout={timeout}")
        paused = f.training_round_two(out, "node1")
        f.mark("node 1 stopped")
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_rounds(f.deployment, out, 2, timeout=timeout + 300)
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        f.mark("round 2 done, node 1 continued")
        f.deployment.wait_for(lambda: (out / "summary.json").is_file(), 400, "the run to finish")
        fault = f"node 1's ClientApp stopped past round 2's {timeout:g} s timeout"
        return {"fault": fault,
                "late_node_id": f.deployment.node_id("node1"),
                **record(out, reference)}  # fmt: skip

    return _timed(scenario, root)


def fault_free_reference(root: Path, rounds: int) -> Path:
    """The tiny preset with ``rounds`` rounds in-process (the fault-free computation)."""
    from livar_merge.engines.inprocess import run_federated
    from livar_merge.federated.config import resolve_config

    out = root / f"inprocess-{rounds}"
    if not (out / "summary.json").is_file():
        run_federated(resolve_config("tiny", None, {"rounds": rounds}), out)
    return out
