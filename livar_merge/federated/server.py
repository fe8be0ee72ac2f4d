"""The server side of one federated round, written once for both engines (flwr-free).

:class:`FederatedServer` owns the server state (the global model and the aggregator, which
keeps its own state) and one round: snapshot of the previous head, the paired evaluations on
the pre-round model, aggregation, installation
(:func:`~livar_merge.federated.install.install_result`: fold and restart, or load factors),
the method's ``after_install`` step (given the engine's
:class:`~livar_merge.aggregation.types.ClientQuery`) and the timing. It names no method: what a
method keeps, broadcasts or asks of clients goes through the aggregator's lifecycle hooks. The
in-process driver (:mod:`livar_merge.engines.inprocess`) and the Flower strategy
(:mod:`livar_merge.flower.strategy`) only move updates and client queries to it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livar_merge.aggregation import AggregationResult, ClientUpdate, make_aggregator, method_spec
from livar_merge.aggregation.types import SVD_ENERGY_KEY, ClientQuery, InstallContext
from livar_merge.errors import ConfigError
from livar_merge.fedavg import fedavg_lora
from livar_merge.federated.data import derive_seed
from livar_merge.federated.install import install_result
from livar_merge.federated.model import head_state
from livar_merge.federated.paired import PairedEvaluation, paired_from_config, with_differences
from livar_merge.federated.ranks import model_rank, start_truncation_energy
from livar_merge.federated.sampling import sample_participants
from livar_merge.lora import LoraDelta
from livar_merge.lora_view import (
    check_lora_targets,
    factor_ranks,
    find_lora_parameters,
    frozen_weights,
    head_module,
    peft_scalings,
)
from livar_merge.tables import GShapTable

if TYPE_CHECKING:
    from livar_merge.federated.config import FedConfig

Evaluate = Callable[[torch.nn.Module], tuple[float, float]]
STATE_PREFIX = "server/"  # checkpoint keys of the method's state: server/<name>


class TimedClientQuery:
    """An engine's :class:`ClientQuery` that adds the seconds its calls took to ``seconds``
    (client-side work, kept out of the server's aggregation time)."""

    def __init__(self, clients: ClientQuery) -> None:
        self.clients = clients
        self.seconds = 0.0

    def moments(
        self, updates: Sequence[ClientUpdate], *, full_covariance: bool
    ) -> list[dict[str, np.ndarray]]:
        start = time.perf_counter()
        try:
            return self.clients.moments(updates, full_covariance=full_covariance)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class RoundRecord:
    """What one round did: the accepted updates (in reduction order), the result, timings,
    the paired rows (``difference`` filled in by :meth:`FederatedServer.metrics_row`) and, on
    Flower, one outcome per reply or silent node (``accepted``, ``reason``)."""

    round: int
    updates: list[ClientUpdate]
    result: AggregationResult
    train_seconds: float = 0.0
    aggregation_seconds: float = 0.0  # server: merge, install, after_install (CCVR's head)
    moments_seconds: float = 0.0  # client queries of after_install (CCVR's moment pass)
    paired: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] | None = None
    participants: list[str] = field(default_factory=list)  # sampled to train this round
    # svd mode with clients of a rank below the global model's: {rank: {layer: fraction}} of
    # the global product those clients did not receive at the round's start (ranks.py)
    start_energy: dict[int, dict[str, float]] = field(default_factory=dict)


def server_options(config: FedConfig) -> dict[str, Any]:
    """The :class:`FederatedServer` options of a ``FedConfig`` run, for both engines."""
    return {
        "method": config.method,
        "method_options": config.method_options(),
        "seed": config.seed,
        "table": config.table,
        "lora_merge": config.lora_merge,
        "rounds": config.rounds,
        "paired": paired_from_config(config),
        "evaluated": "sample-weighted-product" if config.protocol == "released" else "global",
        "clients_per_round": config.participants_per_round(),
    }


class FederatedServer:
    """The server state and one round (module docstring).

    Args:
        model: the peft LoRA ViT holding the global model (modified in place every round);
            its LoRA layers and head are checked here (:class:`GlobalStateError`).
        method, method_options: the aggregation method of the registry and its options.
        seed: run seed (LoRA restarts and CCVR's sampling derive from it).
        table: G_SHAP table name or path (its identity goes into every round's config).
        lora_merge: ``product``, ``svd`` or ``factors`` (how a result is installed).
            ``table`` and ``lora_merge`` go to the method when it declares them;
            ``method_options`` must hold only options it declares.
        rounds: the run's number of rounds (a method's ``after_install`` learns whether a
            round is the final one; None: unknown, never final).
        paired: methods also aggregated on every round's updates and scored by ``evaluate``.
        evaluate: ``model -> (top-1, loss)`` on the test set (needed with ``paired``).
        evaluated: the model a round reports (:meth:`evaluated_model`): ``"global"`` (the
            installed global model, paper) or ``"sample-weighted-product"`` (the released code:
            the frozen weights plus ``sum_m n_m/N s B_m A_m`` of the round's client factors,
            LoRA off, the merged head; clients still continue from the installed factors).
        clients_per_round: clients sampled to train each round
            (:func:`~livar_merge.federated.sampling.sample_participants`); None: all.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        method: str,
        method_options: Mapping[str, Any] | None = None,
        seed: int,
        table: str = "paper-table-a",
        lora_merge: str = "product",
        rounds: int | None = None,
        paired: PairedEvaluation | None = None,
        evaluate: Evaluate | None = None,
        evaluated: str = "global",
        clients_per_round: int | None = None,
    ) -> None:
        check_lora_targets(model)
        if paired is not None and evaluate is None:
            raise ConfigError("paired evaluation needs evaluate (model -> top-1, loss)")
        self.model = model
        self.method = method
        run_options = method_spec(method).select({"table": table, "lora_merge": lora_merge})
        options = {**run_options, **dict(method_options or {})}
        self.aggregator = make_aggregator(method, **options)
        self.seed = seed
        self.table = table
        self.lora_merge = lora_merge
        self.rounds = rounds
        self.paired = paired
        self.evaluate = evaluate
        self.scalings = peft_scalings(model)
        self.layer_names = tuple(find_lora_parameters(model))
        self.rank = model_rank(model)  # the global model's LoRA rank (svd target)
        # clients also compute the paired methods' statistics, after local training
        self.needs = self.aggregator.needs | (paired.needs if paired else frozenset())
        # whether the method or a paired method reads the G_SHAP table
        self.reads_table = method_spec(method).uses_table or (
            paired is not None and any(method_spec(m).uses_table for m in paired.methods)
        )
        # the round and merged LoRA of the last install (product mode: folded into the
        # frozen weights; the Flower transport sends it to nodes that hold the previous ones)
        self.last_install: tuple[int, Mapping[str, LoraDelta]] | None = None
        if evaluated not in ("global", "sample-weighted-product"):
            raise ConfigError("evaluated must be 'global' or 'sample-weighted-product'")
        if evaluated != "global" and lora_merge != "factors":
            raise ConfigError("the sample-weighted evaluated model needs lora_merge 'factors'")
        self.evaluated = evaluated
        if clients_per_round is not None and clients_per_round < 1:
            raise ConfigError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        # the round's sum_m n_m/N s B_m A_m per layer (evaluated="sample-weighted-product")
        self.evaluated_delta: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(
        cls, model: torch.nn.Module, config: FedConfig, evaluate: Evaluate | None = None
    ) -> FederatedServer:
        """The server of a ``FedConfig`` run."""
        return cls(model, **server_options(config), evaluate=evaluate)

    @functools.cached_property
    def table_identity(self) -> dict[str, Any]:
        """Name, version and checksum of the run's G_SHAP table (replies must carry them)."""
        return GShapTable.load(self.table).identity()

    # ------------------------------------------------------------------------ the round
    def participants(self, round_index: int, available: Iterable[str]) -> list[str]:
        """The clients of ``available`` that train in round ``round_index``, in client-id
        order: all, or ``clients_per_round`` of them sampled by the run seed and round."""
        return sample_participants(
            available, self.clients_per_round, seed=self.seed, round_index=round_index
        )

    @functools.cached_property
    def accepts_mixed_ranks(self) -> bool:
        """Whether client updates of LoRA ranks other than the global model's can be merged
        into it: the method and the paired ones merge products (``MethodSpec.mixed_ranks``)
        and ``lora_merge`` is not ``factors`` (Flower replies are checked against it)."""
        names = [self.method, *(self.paired.methods if self.paired else [])]
        try:
            for name in names:
                method_spec(name).check_client_ranks(
                    [self.rank, self.rank + 1], lora_merge=self.lora_merge, rank=self.rank
                )
        except ConfigError:
            return False
        return True

    def previous_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of the global head ``(weight [C, D], bias [C])`` before this round's merge."""
        return head_state(self.model)

    def broadcast(self) -> dict[str, torch.Tensor]:
        """What the method sends to clients with the next round's training instruction
        (``{name: tensor}``, e.g. FedProto's ``prototypes [C, D]``; on the CPU)."""
        return self.aggregator.broadcast()

    def aggregate_round(
        self,
        round_index: int,
        updates: list[ClientUpdate],
        *,
        train_seconds: float = 0.0,
        clients: ClientQuery | None = None,
        outcomes: list[dict[str, Any]] | None = None,
        participants: Sequence[str] | None = None,
    ) -> RoundRecord:
        """Aggregate ``updates`` (in reduction order) into the next global model.

        ``clients``: the engine's query of the round's clients, for the method's
        ``after_install`` (CCVR's moments); ``participants``: the clients sampled to train
        (default: those of ``updates``).
        """
        previous = self.previous_head()
        ranks = sorted(set().union(*(factor_ranks(u.lora) for u in updates)))
        # the svd target only when a client's rank differs (methods without rank= still run)
        rank = self.rank if ranks != [self.rank] else None
        start_energy: dict[int, dict[str, float]] = {}
        if self.lora_merge == "svd":  # what clients below the global rank started without
            for low in (r for r in ranks if r < self.rank):
                start_energy[low] = start_truncation_energy(self.model, low)
        paired_rows: list[dict[str, Any]] = []
        if self.paired is not None:  # on the pre-round global model, before it is replaced
            paired_rows = self.paired.evaluate_round(
                self.model,
                updates,
                round_index=round_index,
                previous_head=previous,
                scaling=self.scalings,
                evaluate=self.evaluate,  # type: ignore[arg-type]
                rank=rank,
            )
        start = time.perf_counter()
        result = self.aggregator.aggregate(
            updates, previous_head=previous, scaling=self.scalings, rank=rank
        )
        install_result(
            self.model,
            result,
            lora_merge=self.lora_merge,
            seed=self.seed,
            round_index=round_index,
        )
        self.last_install = (round_index, result.lora)
        if self.evaluated == "sample-weighted-product":
            merged = fedavg_lora(
                [u.lora for u in updates],
                [u.num_samples for u in updates],
                mode="product",
                scaling=self.scalings,
            )
            self.evaluated_delta = {layer: d.to_dense() for layer, d in merged.items()}
        timed = TimedClientQuery(clients) if clients is not None else None
        self.aggregator.after_install(
            updates,
            InstallContext(
                round_index=round_index,
                final_round=round_index == self.rounds,
                head=head_module(self.model),
                seed_for=functools.partial(derive_seed, self.seed, round_index),
                clients=timed,
            ),
        )
        moments_seconds = timed.seconds if timed is not None else 0.0
        # server time only: merge, install, after_install (not the clients' query)
        seconds = time.perf_counter() - start - moments_seconds
        return RoundRecord(
            round_index,
            list(updates),
            result,
            train_seconds=train_seconds,
            aggregation_seconds=seconds,
            moments_seconds=moments_seconds,
            paired=paired_rows,
            outcomes=outcomes,
            participants=list(
                participants if participants is not None else [u.client_id for u in updates]
            ),
            start_energy=start_energy,
        )

    def evaluated_model(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The model this round reports: the global model itself, or (released code) the
        frozen weights plus the round's sample-weighted product with LoRA off; the global
        model is restored exactly afterwards."""
        if self.evaluated_delta is None:
            return contextlib.nullcontext(self.model)
        return frozen_weights(self.model, add=self.evaluated_delta, zero_lora=True)

    def metrics_row(
        self, record: RoundRecord, accuracy: float, loss: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``metrics.csv``'s row of a round evaluated at ``(accuracy, loss)`` and its
        ``paired.csv`` rows with the differences to ``accuracy``."""
        row: dict[str, Any] = {
            "round": record.round,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "train_seconds": record.train_seconds,
            "aggregation_seconds": record.aggregation_seconds,
            "moments_seconds": record.moments_seconds,
            "paired_seconds": sum(
                r["aggregation_seconds"] + r["evaluation_seconds"] for r in record.paired
            ),
            "uncovered_classes": len(record.result.head.uncovered),
        }
        energies = record.result.details.get(SVD_ENERGY_KEY)
        if energies:  # svd merges: mean over layers of the discarded fraction (svd_energy.csv)
            row["svd_discarded_energy"] = float(np.mean(list(energies.values())))
        if self.clients_per_round is not None:
            row["participants"] = " ".join(record.participants)
        if record.outcomes is not None:
            accepted = sum(bool(o["accepted"]) for o in record.outcomes)
            row["replies_accepted"] = accepted
            row["replies_dropped"] = len(record.outcomes) - accepted
        return row, with_differences(record.paired, accuracy)

    # ------------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Server state beyond the global model, for the checkpoint: the method's
        :meth:`~livar_merge.aggregation.types.Aggregator.state` under ``server/<name>``."""
        state = self.aggregator.state()
        return {STATE_PREFIX + k: v.contiguous().cpu() for k, v in state.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (other checkpoint tensors are ignored)."""
        n = len(STATE_PREFIX)
        state = {k[n:]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        self.aggregator.load_state(state)
