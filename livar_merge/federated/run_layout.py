"""The run folder of ``livar-fed``: its layout (every path a property) and its one reader.

One folder per run (layout version :data:`LAYOUT_VERSION`, recorded in ``config.json``)::

    config.json        resolved options, config hash, layout version (and the Flower settings
                       on that engine)
    provenance.json    package versions, git commit, table name/version/checksum, model weights
    partition.csv      clients x classes sample counts of the Dirichlet split
    metrics.csv/.json  per round: test top-1, test loss, train/aggregation/moments seconds
                       (svd merges: svd_discarded_energy, the mean over layers)
    clients.csv        per round and client: samples, train loss/accuracy, steps, seconds, bytes
                       (and lora_rank with --client-ranks)
    alpha.csv          per round, client and layer: omega_A, omega_B, bins, LoRA weight
    head_weights.csv   per round, client and class: head merge weight, sigma, count
    paired.csv         (--paired) per round and paired method: top-1, loss, difference to the
                       run's own method on the same client updates, its cost
    replies.csv        (Flower) one row per reply or silent node: accepted, reason
    svd_energy.csv     (lora_merge svd) per round, layer and stage: the fraction of the exact
                       merged product's energy the svd merge to lora_rank discarded (merge)
                       and, with --client-ranks, what clients of a lower rank did not receive
                       of the global product at the round's start (client-start)
    summary.json       final and best accuracy, wall time (written when every round is done)
    checkpoint/        global.safetensors (global model, server state) and state.json (rows,
                       client memories) after the last completed round, for --resume

The writer is :class:`livar_merge.federated.run_folder.RunFolder`; :class:`RunReader` is the
reader of ``livar-export``, ``livar-sweep`` and ``analysis``. A folder written before the layout
had a version (no ``layout_version``) is version 1. A grid root (``livar-sweep --root``) holds
run folders and the grid's tables (:class:`GridLayout`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import read_csv, read_json_object
from livar_merge.errors import ConfigError, RunReadError
from livar_merge.federated.migrations import upgrade_options

if TYPE_CHECKING:
    import pandas as pd

LAYOUT_VERSION = 1
# the per-round tables (``<name>.csv``); the optional ones are written once they have rows
TABLES = ("metrics", "clients", "alpha", "head_weights", "paired", "replies", "svd_energy")
OPTIONAL_TABLES = ("paired", "replies", "svd_energy")


@dataclass(frozen=True)
class RunLayout:
    """The paths of a run folder ``root`` (nothing is read or created)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def partition(self) -> Path:
        return self.root / "partition.csv"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def global_tensors(self) -> Path:
        return self.checkpoint / "global.safetensors"

    @property
    def state(self) -> Path:
        return self.checkpoint / "state.json"

    def table(self, name: str) -> Path:
        """``<name>.csv``, one of :data:`TABLES`."""
        if name not in TABLES:
            raise ValueError(f"{name!r} is not a run table; tables: {TABLES}")
        return self.root / f"{name}.csv"

    def holds_run(self) -> bool:
        """Whether the folder holds a run (its header and at least one round's metrics)."""
        return self.config.is_file() and self.table("metrics").is_file()

    def is_finished(self) -> bool:
        """Every round done (``summary.json`` written)."""
        return self.summary.is_file()

    def has_checkpoint(self) -> bool:
        """A completed round to resume from or export."""
        return self.global_tensors.is_file() and self.state.is_file()


@dataclass(frozen=True)
class GridLayout:
    """The tables ``livar-sweep`` writes to a grid root beside its run folders."""

    root: Path

    @property
    def table_csv(self) -> Path:
        return self.root / "table.csv"

    @property
    def table_stats(self) -> Path:
        return self.root / "table_stats.csv"

    @property
    def table_md(self) -> Path:
        return self.root / "table.md"

    @property
    def costs_csv(self) -> Path:
        return self.root / "costs.csv"

    @property
    def costs_md(self) -> Path:
        return self.root / "costs.md"

    @property
    def paired_csv(self) -> Path:
        return self.root / "paired.csv"

    @property
    def paired_md(self) -> Path:
        return self.root / "paired.md"


def run_folders(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it holds a run, else its sub-folders that do (a sweep root)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    if RunLayout(folder).holds_run():
        return [folder]
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and RunLayout(c).holds_run()]


class RunReader:
    """Reads a run folder back (lazily, each file once); every failure is a
    :class:`RunReadError` naming the file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.layout = RunLayout(Path(root))

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> RunReader:
        """A reader of ``root``, its ``config.json`` read and checked now."""
        reader = cls(root)
        _ = reader.document
        return reader

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def document(self) -> dict[str, Any]:
        """``config.json``: ``config`` (the resolved options), ``config_hash``, the layout
        version; refuses a layout newer than this livar reads."""
        document = read_json_object(self.layout.config)
        if not isinstance(document.get("config"), dict):
            raise RunReadError(f"{self.layout.config} has no 'config' object")
        version = document.get("layout_version", 1)
        if not isinstance(version, int) or not 1 <= version <= LAYOUT_VERSION:
            raise RunReadError(
                f"{self.layout.config}: layout_version {version!r}; this livar reads run "
                f"folders of layout 1 to {LAYOUT_VERSION} (a newer livar wrote it)"
            )
        return document

    @property
    def config(self) -> dict[str, Any]:
        """The resolved options (``config.json``'s ``config``), in today's form whatever livar
        version wrote them (:func:`~livar_merge.federated.migrations.upgrade_options`)."""
        version = self.document.get("options_version", 1)
        try:
            return upgrade_options(self.document["config"], version)
        except ConfigError as err:
            raise RunReadError(f"{self.layout.config}: {err}") from err

    @property
    def config_hash(self) -> str | None:
        value = self.document.get("config_hash")
        return None if value is None else str(value)

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset", "?"))

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def beta(self) -> float:
        return float(self.config.get("beta", float("nan")))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def finished(self) -> bool:
        return self.layout.is_finished()

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` of a finished run, None while rounds remain."""
        return read_json_object(self.layout.summary) if self.finished else None

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """``provenance.json``; empty if the folder has none."""
        path = self.layout.provenance
        return read_json_object(path) if path.is_file() else {}

    def has_table(self, name: str) -> bool:
        return self.layout.table(name).is_file()

    def table(self, name: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
        """``<name>.csv`` with at least ``columns``."""
        return read_csv(self.layout.table(name), columns)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """``metrics.csv``: one row per completed round."""
        return self.table("metrics", ("round", "test_accuracy"))

    @cached_property
    def alpha(self) -> pd.DataFrame:
        """``alpha.csv``: the LoRA merge weight per round, client and layer (not empty)."""
        frame = self.table("alpha", ("round", "client", "layer", "weight"))
        if frame.empty:
            raise RunReadError(f"{self.layout.table('alpha')} is empty")
        return frame
