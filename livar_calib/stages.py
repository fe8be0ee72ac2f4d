"""Which calibration stages may be skipped: ``stages.json``, the ledger of stages 2-6.

Each stage records the digest of its inputs (the options it reads and the sha256 of the files
it reads, so a changed upstream output invalidates everything downstream of it) and the sha256
of every file it wrote. A resumed calibration skips a stage, and loads its outputs instead,
only when the recorded digest equals the digest of its inputs now and every recorded output is
still there with the recorded checksum; otherwise the stage runs and its entry is replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from livar_merge._io import file_sha256, read_json_object, write_json

LEDGER_FILE = "stages.json"
T = TypeVar("T")


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """SHA-256 of a stage's inputs (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class StageLedger:
    """The ledger of one calibration folder (module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / LEDGER_FILE
        self.entries: dict[str, Any] = read_json_object(self.path) if self.path.exists() else {}
        self.outcome: dict[str, str] = {}  # stage -> "computed" | "reused" (this invocation)

    def checksum(self, name: str) -> str | None:
        """sha256 of an output file of the folder (None when it does not exist)."""
        path = self.root / name
        return file_sha256(path) if path.exists() else None

    def inputs_of(self, stage: str) -> str | None:
        """The recorded input digest of ``stage``: the identity of its results for a later
        stage whose outputs are not byte-reproducible (skops zips carry timestamps)."""
        entry = self.entries.get(stage)
        return entry.get("inputs") if isinstance(entry, dict) else None

    def fresh(self, stage: str, inputs: Mapping[str, Any]) -> bool:
        """Whether ``stage`` ran with these inputs and its outputs are unchanged."""
        entry = self.entries.get(stage)
        if not isinstance(entry, dict) or entry.get("inputs") != inputs_digest(inputs):
            return False
        outputs = entry.get("outputs", {})
        return bool(outputs) and all(self.checksum(n) == sha for n, sha in outputs.items())

    def run(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        compute: Callable[[], T],
        load: Callable[[], T],
    ) -> T:
        """``load()`` when ``stage`` is fresh, else ``compute()`` (which writes ``outputs``,
        paths relative to the folder) and record it."""
        if self.fresh(stage, inputs):
            self.outcome[stage] = "reused"
            return load()
        self.entries.pop(stage, None)
        write_json(self.path, self.entries)  # a crash inside compute leaves it stale, not fresh
        value = compute()
        written = {name: self.checksum(name) for name in outputs}
        missing = [name for name, sha in written.items() if sha is None]
        if missing:
            raise RuntimeError(f"calibration stage {stage} did not write {missing}")
        self.entries[stage] = {"inputs": inputs_digest(inputs), "outputs": written}
        write_json(self.path, self.entries)
        self.outcome[stage] = "computed"
        return value
