"""Federated rounds: partition, local training, aggregation, evaluation, checkpoints.

One results folder per run::

    config.json        resolved options, preset, config hash
    provenance.json    package versions, git commit, table name/version/checksum, model weights
    partition.csv      clients x classes sample counts of the Dirichlet split
    metrics.csv/.json  per round: test top-1, test loss, train/aggregation seconds
    clients.csv        per round and client: samples, train loss/accuracy, steps, seconds
    alpha.csv          per round, client and layer: omega_A, omega_B, bins, LoRA weight
    head_weights.csv   per round, client and class: head merge weight
    paired.csv         (--paired) per round and paired method: top-1, loss, difference to the
                       run's own method on the same client updates, its cost
    summary.json       final and best accuracy, wall time
    checkpoint/        global state after the last completed round (for --resume)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livar_merge.aggregation import AggregationResult, ClientUpdate, make_aggregator
from livar_merge.federated.builders import build_seeded_model, load_train_test
from livar_merge.federated.client import (
    ClientMemory,
    TrainSettings,
    evaluate,
    train_client,
)
from livar_merge.federated.config import FedConfig
from livar_merge.federated.data import BatchSource, derive_seed
from livar_merge.federated.install import install_result
from livar_merge.federated.model import (
    head_module,
    restore_parameters,
    snapshot_trainable,
)
from livar_merge.federated.paired import paired_from_config, paired_summary, with_differences
from livar_merge.federated.results import (
    aggregation_rows,
    run_summary,
    save_global_checkpoint,
    write_csv,
    write_json,
    write_run_header,
)
from livar_merge.lora import peft_scalings

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    """Everything a resumed run needs besides the tensors in the checkpoint."""

    completed_rounds: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    alpha: list[dict[str, Any]] = field(default_factory=list)
    head_weights: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)
    memories: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_runtime(config: Any) -> tuple[torch.device, str, TrainSettings]:
    """Apply ``threads``; resolve the device, the precision and the local-training settings."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    return device, precision, settings_from(config, precision)


def settings_from(config: Any, precision: str) -> TrainSettings:
    """Local-training settings from any config naming the same options (livar-fed, calibrate);
    options a config lacks keep TrainSettings' defaults."""
    from dataclasses import fields

    names = {f.name for f in fields(TrainSettings)} - {"precision"}
    given = {name: getattr(config, name) for name in names if hasattr(config, name)}
    return TrainSettings(**given, precision=precision)


class FederatedRun:
    """A ``livar-fed`` run. ``run()`` trains all remaining rounds and writes the folder."""

    def __init__(self, config: FedConfig, out: Path, *, resume: bool = False) -> None:
        from livar_merge.federated.partition import class_count_table, dirichlet_partition

        self.config = config
        self.out = Path(out)
        self.resume = resume
        self._check_folder()
        self.device, self.precision, self.settings = resolve_runtime(config)

        splits, train, test = load_train_test(config.dataset, config, config.seed)
        self.num_classes = splits.num_classes
        self.dataset_source = splits.source
        labels = np.asarray(train.labels)
        self.parts = dirichlet_partition(
            labels,
            config.num_clients,
            config.beta,
            seed=config.seed,
            min_samples=config.min_client_samples,
        )
        self.partition_table = class_count_table(self.parts, labels, self.num_classes)
        self.client_ids = [f"client_{m}" for m in range(config.num_clients)]

        self.model, self.info = build_seeded_model(config, self.num_classes, config.seed)
        self.model.to(self.device)
        self.scalings = peft_scalings(self.model)
        self.aggregator = make_aggregator(config.method, **config.method_options())
        self.paired = paired_from_config(config)
        # the run's clients also compute what the paired methods need (after local training)
        self.needs = self.aggregator.needs | (self.paired.needs if self.paired else frozenset())
        self.prototypes: torch.Tensor | None = None  # FedProto's server state
        source = {
            "mean": self.info.mean,
            "std": self.info.std,
            "device": self.device,
            "num_workers": config.num_workers,
        }
        self.train_source = BatchSource(train, **source)
        self.test_source = BatchSource(test, **source)
        self.test_indices = np.arange(len(test))
        self.state = RunState()

    # ---------------------------------------------------------------- folder
    def _check_folder(self) -> None:
        config_path = self.out / "config.json"
        if self.resume and not config_path.is_file():
            log.warning("--resume: no run in %s yet; starting from round 1", self.out)
            self.resume = False
        if self.resume:
            import json

            saved = json.loads(config_path.read_text())
            if saved["config_hash"] != self.config.config_hash():
                diff = {
                    k: (saved["config"].get(k), v)
                    for k, v in self.config.to_dict().items()
                    if saved["config"].get(k) != v and k not in ("out", "progress")
                }
                raise ValueError(
                    f"--resume with a different configuration than {config_path}: {diff}"
                )
        elif (self.out / "checkpoint").exists() or (self.out / "summary.json").exists():
            raise FileExistsError(
                f"{self.out} already holds a run; pass --resume to continue it or choose --out"
            )

    def _write_static(self) -> None:
        write_run_header(
            self.out,
            self.config,
            {
                "seed": self.config.seed,
                "aggregator": self.aggregator.describe(),
                "table": self.aggregator.describe().get("table"),
                "model_weights": self.info.weights,
                "weights_provenance": self.info.weights_provenance,
                "dataset_source": self.dataset_source,
                "device": str(self.device),
                "precision": self.precision,
                "threads": torch.get_num_threads(),
            },
        )
        self.partition_table.to_csv(self.out / "partition.csv", index_label="client")

    # ------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> None:
        folder = self.out / "checkpoint"
        save_global_checkpoint(
            folder,
            self.model,
            self.config.lora_merge,
            self.state.completed_rounds,
            self.prototypes,
        )
        write_json(
            folder / "state.json",
            {
                "checkpoint_version": CHECKPOINT_VERSION,
                "config_hash": self.config.config_hash(),
                **self.state.__dict__,
            },
        )

    def load_checkpoint(self) -> None:
        import json

        from safetensors.torch import load_file

        folder = self.out / "checkpoint"
        state_path = folder / "state.json"
        if not state_path.is_file():
            log.info("no checkpoint in %s; starting from round 1", folder)
            return
        data = json.loads(state_path.read_text())
        if data.get("checkpoint_version") != CHECKPOINT_VERSION:
            raise ValueError(f"{state_path}: unsupported checkpoint_version")
        tensors = load_file(str(folder / "global.safetensors"))
        params = dict(self.model.named_parameters())
        head = head_module(self.model)
        with torch.no_grad():
            for key, value in tensors.items():
                kind, name = key.split("/", 1)
                if kind == "lora":
                    params[
                        name.replace(".lora_A.", ".lora_A.default.").replace(
                            ".lora_B.", ".lora_B.default."
                        )
                    ].copy_(value)
                elif kind == "base":
                    params[name].copy_(value)
                elif kind == "head":
                    getattr(head, name).copy_(value)
                elif kind == "server" and name == "prototypes":
                    self.prototypes = value.to(self.device)
        data.pop("checkpoint_version")
        data.pop("config_hash")
        self.state = RunState(**data)

    # ----------------------------------------------------------------- round
    def apply(self, result: AggregationResult, round_index: int) -> None:
        """Install the merged LoRA and head as the next global model."""
        install_result(
            self.model,
            result,
            lora_merge=self.config.lora_merge,
            seed=self.config.seed,
            round_index=round_index,
        )

    def evaluate_model(self, model: torch.nn.Module) -> tuple[float, float]:
        """Test top-1 and loss of ``model`` on the run's test set."""
        return evaluate(
            model,
            self.test_source,
            self.test_indices,
            batch_size=self.config.eval_batch_size,
            precision=self.precision,
        )

    def calibrate_head(self, round_index: int) -> float:
        """CCVR: clients' class feature moments under the new global model, then the server
        re-trains the head on virtual features. Returns the seconds of the clients' moment pass
        (client-side work, reported apart from the server's aggregation time)."""
        from livar_merge.federated.statistics import feature_moments

        start = time.perf_counter()
        moments = [
            feature_moments(
                self.model,
                self.train_source,
                part,
                self.num_classes,
                batch_size=self.config.eval_batch_size,
                full_covariance=self.config.ccvr_covariance == "full",
            )
            for part in self.parts
        ]
        moments_seconds = time.perf_counter() - start
        seed = derive_seed(self.config.seed, round_index, "ccvr")
        self.aggregator.calibrate(head_module(self.model), moments, seed=seed)  # type: ignore[attr-defined]
        return moments_seconds

    def run_round(self, round_index: int, progress: Any = None) -> dict[str, Any]:
        """Train every client from the global model, aggregate, evaluate."""
        start = time.perf_counter()
        global_state = snapshot_trainable(self.model)
        updates: list[ClientUpdate] = []
        for m, client_id in enumerate(self.client_ids):
            restore_parameters(self.model, global_state)
            memory = ClientMemory(**self.state.memories.get(client_id, {}))
            if memory.tracker_state is not None:
                memory.tracker_state = {
                    **memory.tracker_state,
                    "omega": torch.tensor(memory.tracker_state["omega"]),
                }
            update, report = train_client(
                self.model,
                self.train_source,
                self.parts[m],
                client_id=client_id,
                num_classes=self.num_classes,
                settings=self.settings,
                seed=self.config.seed,
                round_index=round_index,
                needs=self.needs,
                memory=memory,
                prototypes=self.prototypes,
            )
            if memory.tracker_state is not None:
                self.state.memories[client_id] = {
                    "tracker_state": {
                        **memory.tracker_state,
                        "omega": memory.tracker_state["omega"].tolist(),
                    }
                }
            updates.append(update)
            self.state.clients.append(
                {
                    "round": round_index,
                    "client": client_id,
                    "num_samples": update.num_samples,
                    "train_loss": report.loss,
                    "train_accuracy": report.accuracy,
                    "steps": report.steps,
                    "seconds": report.seconds,
                    "statistics_seconds": report.statistics_seconds,
                    "upload_bytes": report.upload_bytes,
                    "statistics_bytes": report.statistics_bytes,
                }
            )
            if progress is not None:
                progress.update(1)
        train_seconds = time.perf_counter() - start
        restore_parameters(self.model, global_state)
        head = head_module(self.model)
        previous = (
            head.weight.detach().clone(),
            None if head.bias is None else head.bias.detach().clone(),
        )
        paired_rows: list[dict[str, Any]] = []
        if self.paired is not None:  # on the pre-round global model, before it is replaced
            paired_rows = self.paired.evaluate_round(
                self.model,
                updates,
                round_index=round_index,
                previous_head=previous,
                scaling=self.scalings,
                evaluate=self.evaluate_model,
            )
        agg_start = time.perf_counter()
        result = self.aggregator.aggregate(updates, previous_head=previous, scaling=self.scalings)
        self.apply(result, round_index)
        if "prototypes" in result.details:
            self.prototypes = torch.as_tensor(
                result.details["prototypes"], dtype=torch.float32, device=self.device
            )
        moments_seconds = 0.0
        if "moments" in self.aggregator.needs and (
            self.config.ccvr_rounds == "all" or round_index == self.config.rounds
        ):
            moments_seconds = self.calibrate_head(round_index)
        # server time only: merge, install and (CCVR) head re-training; the clients' moment
        # pass is client-side work and is reported as its own column
        agg_seconds = time.perf_counter() - agg_start - moments_seconds
        self._log_aggregation(round_index, updates, result)
        accuracy, loss = self.evaluate_model(self.model)
        self.state.paired.extend(with_differences(paired_rows, accuracy))
        row = {
            "round": round_index,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "train_seconds": train_seconds,
            "aggregation_seconds": agg_seconds,
            "moments_seconds": moments_seconds,
            "paired_seconds": sum(
                r["aggregation_seconds"] + r["evaluation_seconds"] for r in paired_rows
            ),
            "uncovered_classes": len(result.head.uncovered),
        }
        self.state.metrics.append(row)
        return row

    def _log_aggregation(
        self, round_index: int, updates: list[ClientUpdate], result: AggregationResult
    ) -> None:
        alpha, heads = aggregation_rows(round_index, updates, result)
        self.state.alpha.extend(alpha)
        self.state.head_weights.extend(heads)

    def _write_tables(self) -> None:
        write_csv(self.out / "metrics.csv", self.state.metrics)
        write_json(self.out / "metrics.json", self.state.metrics)
        write_csv(self.out / "clients.csv", self.state.clients)
        write_csv(self.out / "alpha.csv", self.state.alpha)
        write_csv(self.out / "head_weights.csv", self.state.head_weights)
        if self.state.paired:
            write_csv(self.out / "paired.csv", self.state.paired)

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Run the remaining rounds (all, or up to round ``stop_after``) and return the summary."""
        from tqdm.auto import tqdm

        wall = time.perf_counter()
        self._write_static()
        if self.resume:
            self.load_checkpoint()
        first = self.state.completed_rounds + 1
        last = self.config.rounds if stop_after is None else min(stop_after, self.config.rounds)
        total = max(0, last - first + 1) * len(self.client_ids)
        with tqdm(
            total=total,
            disable=not self.config.progress,
            unit="client",
            desc=self.config.run_name(),
        ) as bar:
            for r in range(first, last + 1):
                row = self.run_round(r, progress=bar)
                self.state.completed_rounds = r
                self._write_tables()
                self.save_checkpoint()
                bar.set_postfix(round=r, acc=f"{row['test_accuracy']:.4f}")
        extra = {}
        if self.state.paired:
            extra["paired"] = paired_summary(self.state.paired, self.config.method)
        summary = run_summary(
            self.config, self.state.metrics, self.info, time.perf_counter() - wall, **extra
        )
        if self.state.completed_rounds == self.config.rounds:
            write_json(self.out / "summary.json", summary)
        return summary


def run_federated(
    config: FedConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated experiment; returns the summary dict."""
    folder = Path(out or config.out or Path("runs") / config.run_name())
    return FederatedRun(config, folder, resume=resume).run(stop_after=stop_after)
