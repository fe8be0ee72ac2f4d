"""A Flower deployment on loopback for the tests: SuperLink, SuperNodes and the ``flwr`` CLI as
real processes, each with its own ``FLWR_HOME`` and log, all killed (process groups and any
child that left them) when the :class:`Loopback` context ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import REPO

MARK = "LIVAR_FLOWER_TEST_MARK"
TOOLS = ("flower-superlink", "flower-supernode", "flwr")


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


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Loopback(contextlib.AbstractContextManager["Loopback"]):
    """Processes of one test deployment under ``root`` (logs in ``root/logs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            MARK: self.token,
            "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.started: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}

    def home(self, name: str) -> Path:
        home = self.root / f"home-{name}"
        home.mkdir(exist_ok=True)
        return home

    def start(
        self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` as process ``name`` in its own process group and FLWR_HOME."""
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(command),
            env={**self.env, "FLWR_HOME": str(self.home(name)), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        self.started[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        tails = "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
            for p in sorted(self.logs.glob("*.log"))
        )
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")

    def exited(self, name: str, timeout: float) -> int:
        """The exit status of process ``name`` (waits up to ``timeout`` s)."""
        proc, _ = self.started[name]
        self.wait_for(lambda: proc.poll() is not None, timeout, f"{name} to exit")
        return int(proc.returncode)

    def kill(self, name: str) -> None:
        proc, _ = self.started[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def node_id(self, name: str) -> int:
        """The SuperNode ID process ``name`` logged."""
        return int(self.log(name).split("SuperNode ID:")[1].split()[0])

    # ------------------------------------------------------------------------- flwr CLI
    def cli_config(self, federation: str, address: str, *, root_certificates: Path | None) -> None:
        """The ``flwr`` CLI's config.toml: ``federation`` at ``address`` (TLS with the CA
        ``root_certificates``, else insecure)."""
        tls = (
            f'root-certificates = "{root_certificates}"\n'
            if root_certificates is not None
            else "insecure = true\n"
        )
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{federation}"\n\n'
            f'[superlink.{federation}]\naddress = "{address}"\n{tls}'
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI (its FLWR_HOME is ``home-cli``)."""
        return subprocess.run(
            ["flwr", *args],
            env={**self.env, "FLWR_HOME": str(self.home("cli"))},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def run_app(self, federation: str, run_config: str) -> dict[str, Any]:
        """``flwr run`` of this repository's Flower App; the submission's JSON."""
        done = self.flwr(
            "run", str(REPO), federation, "--format", "json", "--run-config", run_config
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        assert result["success"] is True, result
        return result

    def __exit__(self, *exc: object) -> None:
        for proc, _ in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc, log in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            log.close()
        for pid in marked_processes(self.token):  # children that left the process groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while marked_processes(self.token) and time.monotonic() < deadline:
            time.sleep(0.2)

    def all_gone(self) -> bool:
        return marked_processes(self.token) == []
