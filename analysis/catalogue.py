"""The catalogue of a regeneration: what was made (files), skipped (why) or failed (error).

Printed one line per item and written to ``<out>/catalogue.json``::

    Figure 2: made figures/figure2.png, figures/figure2.pdf
    Figure A: skipped, calibration run /x has no shap_values_samples.csv
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MADE, SKIPPED, FAILED = "made", "skipped", "failed"


@dataclass
class Entry:
    """One figure or table: ``status`` is made / skipped / failed."""

    id: str
    label: str
    status: str
    files: list[str] = field(default_factory=list)
    reason: str = ""
    detail: str = ""
    sources: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.status == MADE:
            text = f"{self.label}: made {', '.join(self.files)}"
            return text + (f" ({self.detail})" if self.detail else "")
        return f"{self.label}: {self.status}, {self.reason}"


@dataclass
class Catalogue:
    """Entries in the order they were produced, with paths relative to ``out``."""

    out: Path
    inputs: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)

    def _relative(self, path: str | os.PathLike[str]) -> str:
        path = Path(path)
        try:
            return path.resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(path)

    def made(
        self,
        id: str,
        label: str,
        files: list[Path],
        *,
        detail: str = "",
        sources: list[str] | None = None,
    ) -> Entry:
        entry = Entry(
            id,
            label,
            MADE,
            [self._relative(f) for f in files],
            detail=detail,
            sources=[str(s) for s in sources or []],
        )
        self.entries.append(entry)
        return entry

    def skipped(self, id: str, label: str, reason: str) -> Entry:
        entry = Entry(id, label, SKIPPED, reason=reason)
        self.entries.append(entry)
        return entry

    def failed(self, id: str, label: str, error: BaseException) -> Entry:
        entry = Entry(id, label, FAILED, reason=f"{type(error).__name__}: {error}")
        self.entries.append(entry)
        return entry

    def by_id(self, id: str) -> Entry:
        """The entry with ``id`` (KeyError if none)."""
        for entry in self.entries:
            if entry.id == id:
                return entry
        raise KeyError(id)

    def count(self, status: str) -> int:
        return sum(entry.status == status for entry in self.entries)

    def lines(self) -> list[str]:
        return [entry.line() for entry in self.entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "counts": {s: self.count(s) for s in (MADE, SKIPPED, FAILED)},
            "entries": [asdict(entry) for entry in self.entries],
        }

    def write(self) -> Path:
        """Write ``catalogue.json`` into ``out``."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "catalogue.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path
