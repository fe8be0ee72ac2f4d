"""The LIVAR Flower ServerApp (``server_app``; component in ``pyproject.toml``).

It runs the same computation as ``livar-fed``: the federation is built from the seed
(:func:`~livar_merge.federated.federation.build_federation`, as the ClientApps build theirs),
:class:`~livar_merge.flower.strategy.LivarStrategy` runs the rounds, the ServerApp evaluates
centrally after each round and writes the results folder with the same
:class:`~livar_merge.federated.run_folder.RunFolder` as ``livar-fed`` (plus ``replies.csv``).

Options. The ServerApp reads the run config (``[tool.flwr.app.config]``, ``flwr run
--run-config``): ``preset``, ``config-file`` (TOML/JSON of livar-fed options on the ServerApp's
machine), ``options`` (``"key=value key=value"`` livar-fed options) and any livar-fed option
by its hyphenated name (an empty string means "not set"), in that order of priority, plus the
:class:`~livar_merge.flower.strategy.FlowerSettings` ``min-replies`` (0: a majority of
``num-clients``), ``round-timeout`` and ``node-wait-timeout`` (seconds), and the
:class:`RunControl` keys ``resume`` (``true``: continue the run in ``out`` after its last
checkpointed round, as ``livar-fed --resume``; the configuration must be the same) and
``stop-after`` (stop after that round; resume later). Every option is validated before
anything is built. The resolved options go to the clients with every round.

A ServerApp that dies (killed, its machine lost) leaves the folder at its last completed round:
``flwr run ... --run-config "... resume=true"`` starts a new Flower run that loads the
checkpoint (global model, server state, every row) and continues with the next round; the
SuperNodes serve the new run as they are, and each gets the full frozen weights once again
(:mod:`~livar_merge.flower.base_sync`). The resumed run computes what the uninterrupted one
would have: every round's seeds derive from ``(seed, round, client)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from livar_merge.errors import RunConfigError
from livar_merge.federated.config import FedConfig, load_config_file, resolve_config
from livar_merge.federated.federation import build_federation
from livar_merge.federated.run_folder import RunFolder, run_provenance
from livar_merge.federated.server import FederatedServer
from livar_merge.flower.strategy import DEFAULTS, FlowerSettings, LivarStrategy
from livar_merge.lora_view import frozen_checksum

log = logging.getLogger("flwr.livar")  # Flower's handler: shown in `flwr log` too
SETTINGS_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(FlowerSettings))
CONTROL_KEYS = ("resume", "stop-after")
SERVER_KEYS = ("preset", "config-file", "options", *SETTINGS_KEYS, *CONTROL_KEYS)


@dataclasses.dataclass(frozen=True)
class RunControl:
    """How far a ServerApp runs: from the start or (``resume``) after the folder's last
    checkpointed round, up to ``stop_after`` (None: every round). Not part of the
    configuration: a run stopped or resumed computes what an uninterrupted one does."""

    resume: bool = False
    stop_after: int | None = None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunControl:
        """``resume`` (true/false, "" = false) and ``stop-after`` (a round >= 1, "" = none)."""
        resume = run_config.get("resume", "")
        if isinstance(resume, str):
            if resume.strip().lower() not in ("", "true", "false"):
                raise RunConfigError(f"run config 'resume' = {resume!r} is not true or false")
            resume = resume.strip().lower() == "true"
        elif not isinstance(resume, bool):
            raise RunConfigError(f"run config 'resume' = {resume!r} is not true or false")
        stop = run_config.get("stop-after", "")
        stop_after: int | None = None
        if stop != "":
            if isinstance(stop, bool) or not str(stop).strip().isdigit() or int(stop) < 1:
                raise RunConfigError(f"run config 'stop-after' = {stop!r} is not a round >= 1")
            stop_after = int(stop)
        return cls(resume=resume, stop_after=stop_after)


def settings_from_run_config(run_config: Mapping[str, Any]) -> FlowerSettings:
    """The :class:`FlowerSettings` of a run config ("" or absent: the default)."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(FlowerSettings):
        value = run_config.get(f.name.replace("_", "-"), "")
        if value == "":
            continue
        caster = int if f.type in ("int", int) else float
        try:
            given[f.name] = caster(value)
        except (TypeError, ValueError) as err:
            raise RunConfigError(
                f"run config {f.name.replace('_', '-')!r} = {value!r} is not a number"
            ) from err
        if given[f.name] < 0:
            raise RunConfigError(f"run config {f.name.replace('_', '-')!r} must be >= 0")
    return FlowerSettings(**given)


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[FedConfig, FlowerSettings]:
    """livar-fed options and server settings from a Flower run config (module docstring)."""
    names = {f.name for f in dataclasses.fields(FedConfig)}
    unknown = [k for k in run_config if k not in SERVER_KEYS and k.replace("-", "_") not in names]
    if unknown:
        raise RunConfigError(
            f"run config keys {unknown} are neither livar-fed options nor {SERVER_KEYS}"
        )
    preset = str(run_config.get("preset", "") or "") or None
    path = str(run_config.get("config-file", "") or "")
    file_options = load_config_file(path) if path else {}
    overrides: dict[str, Any] = {}
    for item in shlex.split(str(run_config.get("options", "") or "")):
        key, sep, value = item.partition("=")
        if not sep:
            raise RunConfigError(f"run config 'options': {item!r} is not key=value")
        overrides[key.strip().replace("-", "_")] = value
    for key, value in run_config.items():
        if key not in SERVER_KEYS and value != "":
            overrides[key.replace("-", "_")] = value
    return resolve_config(preset, file_options, overrides), settings_from_run_config(run_config)


def check_control(config: FedConfig, control: RunControl) -> None:
    """Refuse a resume the Flower engine cannot continue exactly."""
    if control.resume and config.omega_cumulative:
        raise RunConfigError(
            "resume with omega_cumulative: each client's running omega lives in its node's "
            "state of the Flower run, which a resumed (new) Flower run starts empty"
        )


class ServerRun:
    """One Flower run on the server side: federation, strategy, evaluation, results folder
    (``control``: resume it from the folder, stop early)."""

    def __init__(
        self,
        config: FedConfig,
        settings: FlowerSettings | None = None,
        control: RunControl | None = None,
    ) -> None:
        self.config = replace(config, engine="flower")
        self.settings = settings or DEFAULTS
        self.control = control or RunControl()
        self.folder = RunFolder(config.out_dir(), self.config)
        check_control(self.config, self.control)  # before anything is built
        self.resume = self.folder.check(resume=self.control.resume)
        self.federation = build_federation(
            config, dataset=config.dataset, seed=config.seed, beta=config.beta
        )
        self.model = self.federation.model
        self.strategy = LivarStrategy(
            FederatedServer.from_config(self.model, config, self.federation.evaluate),
            settings=self.settings,
            min_available_nodes=config.num_clients,
            config_hash=config.config_hash(),
            frozen_checksum=frozen_checksum(self.model, config.lora_merge),
        )

    @staticmethod
    def check_folder(config: FedConfig, control: RunControl) -> bool:
        """Refuse a folder holding another run (or, resuming, another configuration); returns
        whether there is a run to resume. Writes nothing."""
        check_control(config, control)
        config = replace(config, engine="flower")
        return RunFolder(config.out_dir(), config).check(resume=control.resume)

    def _write_header(self) -> None:
        provenance = run_provenance(self.federation, self.strategy.server)
        provenance["engine"] = "flower"
        provenance["table"] = self.strategy.table_identity  # replies echo it: always named
        self.folder.write_header(
            provenance,
            partition=self.federation.partition_table,
            flower=dataclasses.asdict(self.settings),
        )

    def evaluate(self, round_index: int, arrays: Any) -> MetricRecord | None:
        """Central evaluation after each round (none before round 1, as livar-fed)."""
        if round_index == 0:
            return None
        self.strategy.sync(arrays)
        with self.strategy.server.evaluated_model() as evaluated:
            accuracy, loss = self.federation.evaluate(evaluated)
        record = self.strategy.history[-1]
        row, paired_rows = self.strategy.server.metrics_row(record, accuracy, loss)
        self.folder.add_round(record, row, paired_rows)
        self.folder.write_tables()
        self.folder.save_checkpoint(self.model, self.strategy.server.state_tensors())
        log.info("round %d: test top-1 %.4f, loss %.4f", round_index, accuracy, loss)
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    def run(self, grid: Grid) -> dict[str, Any]:
        """Run all rounds on ``grid`` and write ``summary.json``; returns the summary."""
        wall = time.perf_counter()
        self._write_header()
        if self.resume:
            self.strategy.server.load_state_tensors(self.folder.load_checkpoint(self.model))
        done = self.folder.rows.completed_rounds
        if self.resume:
            self.folder.rows.resumed_after.append(done)
            log.info("resumed %s after round %d", self.folder.out, done)
        stop = self.control.stop_after
        last = self.config.rounds if stop is None else min(stop, self.config.rounds)
        self.strategy.rounds.completed_before = done
        train_config = ConfigRecord(
            {
                # the trackers are the server's: nodes need not have them installed
                "livar-config": json.dumps(replace(self.config, track=[]).to_dict()),
                "config-hash": self.config.config_hash(),
            }
        )
        if last > done:
            self.strategy.start(
                grid,
                initial_arrays=self.strategy.initial_arrays(),
                num_rounds=last - done,
                timeout=self.settings.round_timeout,
                train_config=train_config,
                evaluate_fn=self.evaluate,
            )
        wall_seconds = time.perf_counter() - wall
        summary = self.folder.summary(self.federation.info, wall_seconds, engine="flower")
        if self.folder.rows.completed_rounds == self.config.rounds:
            self.folder.write_summary(summary)
        return summary


def make_server_app(
    config: FedConfig | None = None,
    settings: FlowerSettings | None = None,
    control: RunControl | None = None,
    summaries: list[dict[str, Any]] | None = None,
) -> ServerApp:
    """A ServerApp for ``config`` (the Simulation Engine's Python API passes no run config),
    or, with ``config=None``, for the run config of the Context (``flwr run``); the run's
    summary is appended to ``summaries`` if given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings: FlowerSettings | None
        run_control: RunControl | None
        if config is None:
            run_config, run_settings = config_from_run_config(context.run_config)
            run_control = RunControl.from_run_config(context.run_config)
        else:
            run_config, run_settings, run_control = config, settings, control
        summary = ServerRun(run_config, run_settings, run_control).run(grid)
        if summaries is not None:
            summaries.append(summary)

    return app


server_app = make_server_app()
