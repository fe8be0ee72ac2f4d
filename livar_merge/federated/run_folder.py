"""The run-folder writer of both engines (layout and reader:
:mod:`livar_merge.federated.run_layout`).

:class:`RunFolder` checks the folder before a run, writes the header, accumulates the rows of
every round (:class:`RunRows`), writes the tables and the checkpoint atomically after each
round, reads a checkpoint back for ``--resume`` and writes the summary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from livar_merge._io import read_json_object, save_tensors, write_csv, write_json
from livar_merge.aggregation.types import SVD_ENERGY_KEY
from livar_merge.errors import RunFolderError
from livar_merge.federated.global_state import global_tensors, load_global_tensors
from livar_merge.federated.paired import paired_summary
from livar_merge.federated.results import aggregation_rows, run_summary, write_run_header
from livar_merge.federated.run_layout import OPTIONAL_TABLES, TABLES, RunLayout
from livar_merge.federated.server import FederatedServer, RoundRecord
from livar_merge.lora_view import factor_ranks
from livar_merge.tracking import Trackers

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig
    from livar_merge.federated.federation import Federation

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1
# ClientUpdate.report keys of a client's training report -> clients.csv columns
REPORT_COLUMNS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "train_steps": "steps",
    "train_seconds": "seconds",
    "train_statistics_seconds": "statistics_seconds",
    "train_upload_bytes": "upload_bytes",
    "train_statistics_bytes": "statistics_bytes",
}


@dataclass
class RunRows:
    """Every table row of a run so far, plus the client memories (cumulative omega totals)."""

    completed_rounds: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    alpha: list[dict[str, Any]] = field(default_factory=list)
    head_weights: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)
    svd_energy: list[dict[str, Any]] = field(default_factory=list)
    memories: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed_after: list[int] = field(default_factory=list)  # the round of each resume


def client_rows(record: RoundRecord, *, lora_rank: bool = False) -> list[dict[str, Any]]:
    """``clients.csv`` rows of a round, from the updates and their training reports;
    ``lora_rank``: a column with each client's LoRA rank (runs of mixed ranks)."""
    rows = []
    for update in record.updates:
        row: dict[str, Any] = {"round": record.round, "client": update.client_id}
        if update.origin.node_id is not None:
            row["node_id"] = update.origin.node_id
        row["num_samples"] = update.num_samples
        if lora_rank:
            row["lora_rank"] = max(factor_ranks(update.lora), default=None)
        for key, column in REPORT_COLUMNS.items():
            row[column] = update.report.get(key)
        if update.origin.node_id is not None:  # Flower: payload of the node's train message
            row["download_bytes"] = update.origin.download_bytes
        rows.append(row)
    return rows


def svd_energy_rows(record: RoundRecord, rank: int) -> list[dict[str, Any]]:
    """``svd_energy.csv`` rows of a round: per layer, the fraction of the exact merged
    product's squared Frobenius norm the server's svd merge to ``rank`` discarded (``stage``
    ``merge``) and, for clients of a lower rank that started from the global product
    truncated to theirs, the fraction they did not receive (``client-start``)."""
    rows = [
        energy_row(record.round, "merge", rank, layer, fraction)
        for layer, fraction in record.result.details.get(SVD_ENERGY_KEY, {}).items()
    ]
    for low, energies in sorted(record.start_energy.items()):
        rows.extend(
            energy_row(record.round, "client-start", low, layer, fraction)
            for layer, fraction in energies.items()
        )
    return rows


def energy_row(
    round_index: int, stage: str, rank: int, layer: str, fraction: float
) -> dict[str, Any]:
    """One ``svd_energy.csv`` row."""
    return {
        "round": round_index,
        "stage": stage,
        "rank": rank,
        "layer": layer,
        "discarded_energy": float(fraction),
    }


def run_provenance(federation: Federation, server: FederatedServer) -> dict[str, Any]:
    """What both engines record in ``provenance.json`` about the run they built: seed, method
    and options, G_SHAP table identity, weights and their provenance, data source, device."""
    return {
        "seed": server.seed,
        "aggregator": server.aggregator.describe(),
        "table": server.table_identity if server.reads_table else None,
        "model_weights": federation.info.weights,
        "weights_provenance": federation.info.weights_provenance,
        "dataset_source": federation.dataset_source,
        "device": str(federation.device),
        "precision": federation.precision,
    }


class RunFolder:
    """The results folder ``out`` of a run of ``config`` (a FedConfig)."""

    def __init__(self, out: Path | str, config: FedConfig) -> None:
        self.out = Path(out)
        self.layout = RunLayout(self.out)
        self.config = config
        self.rows = RunRows()
        self.resuming = False  # set by check()
        self.trackers: Trackers | None = None  # the config's trackers, from write_header

    def check(self, *, resume: bool) -> bool:
        """Refuse a folder holding another run; returns whether to resume (False when
        ``resume`` finds no run yet). Writes nothing."""
        self.resuming = self._check(resume)
        return self.resuming

    def _check(self, resume: bool) -> bool:
        config_path = self.layout.config
        if resume and not config_path.is_file():
            log.warning("--resume: no run in %s yet; starting from round 1", self.out)
            return False
        if resume:
            saved = read_json_object(config_path, RunFolderError)
            if saved.get("config_hash") != self.config.config_hash():
                diff = {
                    k: (saved.get("config", {}).get(k), v)
                    for k, v in self.config.to_dict().items()
                    if saved.get("config", {}).get(k) != v and k not in ("out", "progress")
                }
                raise RunFolderError(
                    f"--resume with a different configuration than {config_path}: {diff}"
                )
            return True
        if self.layout.checkpoint.exists() or self.layout.summary.exists():
            raise RunFolderError(
                f"{self.out} already holds a run; pass --resume (Flower run config: "
                "resume=true) to continue it or choose --out"
            )
        return False

    def write_header(
        self, provenance_extra: dict[str, Any], partition: Any = None, **config_extra: Any
    ) -> None:
        """``config.json``, ``provenance.json`` and (given a DataFrame) ``partition.csv``; opens
        the config's trackers (continued when the run resumes)."""
        write_run_header(self.out, self.config, provenance_extra, **config_extra)
        if partition is not None:
            write_csv(self.layout.partition, partition, index=True, index_label="client")
        track = list(getattr(self.config, "track", []))
        if track and self.trackers is None:
            self.trackers = Trackers(
                self.out,
                track,
                title=self.config.run_name(),
                params={k: v for k, v in self.config.to_dict().items() if k != "track"},
                resume=self.resuming,
            )

    def add_round(
        self, record: RoundRecord, metrics_row: dict[str, Any], paired_rows: list[dict[str, Any]]
    ) -> None:
        """Append a finished round's rows."""
        alpha, heads = aggregation_rows(record.round, record.updates, record.result)
        self.rows.metrics.append(metrics_row)
        mixed = bool(getattr(self.config, "mixed_ranks", lambda: False)())
        self.rows.clients.extend(client_rows(record, lora_rank=mixed))
        self.rows.svd_energy.extend(svd_energy_rows(record, self.config.lora_rank))
        self.rows.alpha.extend(alpha)
        self.rows.head_weights.extend(heads)
        self.rows.paired.extend(paired_rows)
        if record.outcomes is not None:
            self.rows.replies.extend(record.outcomes)
        self.rows.completed_rounds = record.round

    def write_tables(self) -> None:
        """The CSV/JSON tables of the rows so far (paired/replies only when there are any)."""
        write_json(self.layout.metrics_json, self.rows.metrics)
        for name in TABLES:
            rows = getattr(self.rows, name)
            if rows or name not in OPTIONAL_TABLES:
                write_csv(self.layout.table(name), rows)

    # ------------------------------------------------------------------- checkpoint
    def save_checkpoint(
        self, model: torch.nn.Module, server_tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """``checkpoint/global.safetensors`` (global model and server state) and
        ``checkpoint/state.json`` (rows, memories), each written atomically."""
        tensors = global_tensors(model, self.config.lora_merge)
        tensors.update(server_tensors or {})
        save_tensors(
            self.layout.global_tensors, tensors, {"round": str(self.rows.completed_rounds)}
        )
        write_json(
            self.layout.state,
            {
                "checkpoint_version": CHECKPOINT_VERSION,
                "config_hash": self.config.config_hash(),
                **asdict(self.rows),
            },
        )
        if self.trackers is not None:  # they mirror what the folder now holds
            self.trackers.log_rounds(self.rows)

    def load_checkpoint(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Restore the rows and ``model`` from the checkpoint; returns the server tensors
        (``server/...``). Without a checkpoint: nothing changes, ``{}``."""
        state_path = self.layout.state
        if not state_path.is_file():
            log.info("no checkpoint in %s; starting from round 1", self.layout.checkpoint)
            return {}
        data = read_json_object(state_path, RunFolderError)
        if data.pop("checkpoint_version", None) != CHECKPOINT_VERSION:
            raise RunFolderError(f"{state_path}: unsupported checkpoint_version")
        data.pop("config_hash", None)
        tensors = load_file(str(self.layout.global_tensors))
        server = {k: v for k, v in tensors.items() if k.startswith("server/")}
        load_global_tensors(model, {k: v for k, v in tensors.items() if k not in server})
        self.rows = RunRows(**data)
        return server

    def summary(self, model_info: Any, wall_seconds: float, **extra: Any) -> dict[str, Any]:
        """The run's summary from the rows so far (with the paired summary when there are
        paired rows); ``extra`` keys go in as they are."""
        if self.rows.paired:
            extra["paired"] = paired_summary(self.rows.paired, self.config.method)
        if self.rows.resumed_after:
            extra["resumed_after"] = list(self.rows.resumed_after)
        return run_summary(self.config, self.rows.metrics, model_info, wall_seconds, **extra)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``; the trackers get the summary and the tables and end their runs."""
        write_json(self.layout.summary, summary)
        if self.trackers is not None:
            final = {
                k: summary.get(k) for k in ("final_accuracy", "best_accuracy", "completed_rounds")
            }
            tables = [self.layout.summary, self.layout.config, self.layout.partition]
            tables += [self.layout.table(name) for name in TABLES]
            self.trackers.finish({"summary": _markdown(final)}, tables)
            self.trackers = None


def _markdown(values: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in values.items())
