"""``livar-fed``'s in-process engine: clients trained one after another in this process.

The driver only moves data: it trains every client from the global model, hands the updates to
:class:`~livar_merge.federated.server.FederatedServer` (which aggregates, installs, runs CCVR
and the paired evaluations), evaluates, and writes the folder with
:class:`~livar_merge.federated.run_folder.RunFolder` (layout in
:mod:`livar_merge.federated.results`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from livar_merge.aggregation import ClientUpdate
from livar_merge.federated.client import ClientMemory, train_client
from livar_merge.federated.config import FedConfig
from livar_merge.federated.federation import build_federation
from livar_merge.federated.model import restore_parameters, snapshot_trainable
from livar_merge.federated.ranks import RankModels
from livar_merge.federated.run_folder import RunFolder, run_provenance
from livar_merge.federated.server import FederatedServer


class FederatedRun:
    """A ``livar-fed`` run. ``run()`` trains all remaining rounds and writes the folder."""

    def __init__(self, config: FedConfig, out: Path, *, resume: bool = False) -> None:
        self.config = config
        self.folder = RunFolder(out, config)
        self.resume = self.folder.check(resume=resume)  # before anything is built or written
        self.federation = build_federation(
            config, dataset=config.dataset, seed=config.seed, beta=config.beta
        )
        self.model = self.federation.model
        self.server = FederatedServer.from_config(
            self.model, config, evaluate=self.federation.evaluate
        )
        # clients of another LoRA rank than lora_rank (client_ranks) train models of their own
        self.rank_models = RankModels(config, self.federation.num_classes, self.federation.device)

    def _write_header(self) -> None:
        provenance = run_provenance(self.federation, self.server)
        provenance["threads"] = torch.get_num_threads()
        self.folder.write_header(provenance, partition=self.federation.partition_table)

    def moments(
        self, updates: Sequence[ClientUpdate], *, full_covariance: bool
    ) -> list[dict[str, np.ndarray]]:
        """The in-process :class:`~livar_merge.aggregation.types.ClientQuery`: each client's
        class feature moments under the installed global model, one after another."""
        index = {cid: m for m, cid in enumerate(self.federation.client_ids)}
        return [
            self.federation.client_moments(
                self.model, index[u.client_id], full_covariance=full_covariance
            )
            for u in updates
        ]

    def run_round(self, round_index: int, progress: Any = None) -> dict[str, Any]:
        """Train the round's participants from the global model (clients of another LoRA rank:
        a model of theirs started from it, :mod:`~livar_merge.federated.ranks`), aggregate,
        evaluate; returns the row."""
        fed, rows = self.federation, self.folder.rows
        start = time.perf_counter()
        global_state = snapshot_trainable(self.model)
        updates: list[ClientUpdate] = []
        participants = self.server.participants(round_index, fed.client_ids)
        index = {cid: m for m, cid in enumerate(fed.client_ids)}
        broadcast = {k: v.to(fed.device) for k, v in self.server.broadcast().items()}
        for client_id in participants:
            m = index[client_id]
            restore_parameters(self.model, global_state)
            model, rank = self.model, self.config.client_rank(m)
            if rank != self.config.lora_rank:  # its own rank, from the global model's state
                model, start_state = self.rank_models.start(rank, self.model, round_index)
                restore_parameters(model, start_state)
            memory = ClientMemory.from_record(rows.memories.get(client_id))
            update, report = train_client(
                model,
                fed.train_source,
                fed.parts[m],
                client_id=client_id,
                num_classes=fed.num_classes,
                settings=fed.settings,
                seed=self.config.seed,
                round_index=round_index,
                needs=self.server.needs,
                memory=memory,
                broadcast=broadcast,
                pretrained_base=fed.pretrained_base,
            )
            if self.config.mixed_ranks():  # the merge folds each client's scaling in
                update.scaling = self.rank_models.scaling(rank)
            memory_record = memory.to_record()
            if memory_record is not None:
                rows.memories[client_id] = memory_record
            update.report = report.metrics()
            updates.append(update)
            if progress is not None:
                progress.update(1)
        train_seconds = time.perf_counter() - start
        restore_parameters(self.model, global_state)
        record = self.server.aggregate_round(
            round_index,
            updates,
            train_seconds=train_seconds,
            clients=self,
            participants=participants,
        )
        with self.server.evaluated_model() as evaluated:
            accuracy, loss = fed.evaluate(evaluated)
        row, paired_rows = self.server.metrics_row(record, accuracy, loss)
        self.folder.add_round(record, row, paired_rows)
        return row

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Run the remaining rounds (all, or up to round ``stop_after``) and return the summary."""
        wall = time.perf_counter()
        self._write_header()
        if self.resume:
            self.server.load_state_tensors(self.folder.load_checkpoint(self.model))
            self.folder.rows.resumed_after.append(self.folder.rows.completed_rounds)
        rows = self.folder.rows
        first = rows.completed_rounds + 1
        last = self.config.rounds if stop_after is None else min(stop_after, self.config.rounds)
        per_round = self.server.clients_per_round or len(self.federation.client_ids)
        total = max(0, last - first + 1) * per_round
        with tqdm(
            total=total,
            disable=not self.config.progress,
            unit="client",
            desc=self.config.run_name(),
        ) as bar:
            for r in range(first, last + 1):
                row = self.run_round(r, progress=bar)
                self.folder.write_tables()
                self.folder.save_checkpoint(self.model, self.server.state_tensors())
                bar.set_postfix(round=r, acc=f"{row['test_accuracy']:.4f}")
        summary = self.folder.summary(self.federation.info, time.perf_counter() - wall)
        if rows.completed_rounds == self.config.rounds:
            self.folder.write_summary(summary)
        return summary


def run_federated(
    config: FedConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated experiment; returns the summary dict."""
    folder = Path(out) if out is not None else config.out_dir()
    return FederatedRun(config, folder, resume=resume).run(stop_after=stop_after)
