"""``livar-fed --engine flower``: the LIVAR Flower App on the Simulation Engine (Ray).

Every client is a virtual SuperNode (``partition-id`` = client index) whose ClientApp gets
``client_cpus``/``client_gpus`` of the machine; the ServerApp runs in this process and writes
the results folder. ``flwr.simulation.run_simulation`` is deprecated in flwr 1.41 but is the
Python entry point of the Simulation Engine (``flwr run`` on a federation with
``options.num-supernodes`` is the CLI one).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from livar_merge.errors import ConfigError, RoundFailedError
from livar_merge.federated.config import FedConfig
from livar_merge.flower.client_app import client_app
from livar_merge.flower.server_app import RunControl, ServerRun, make_server_app
from livar_merge.flower.strategy import FlowerSettings, check_method


def backend_config(config: FedConfig) -> dict[str, Any]:
    """Ray backend settings: the per-ClientApp resources of ``config``."""
    cores = os.cpu_count() or 1
    if config.client_cpus > cores:
        raise ConfigError(
            f"option client_cpus={config.client_cpus:g} exceeds the {cores} CPU cores of this "
            "machine; no ClientApp could be scheduled"
        )
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {"logging_level": "WARNING", "log_to_driver": True},
    }


def run_flower_simulation(
    config: FedConfig,
    out: str | Path | None = None,
    *,
    settings: FlowerSettings | None = None,
    control: RunControl | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run ``config`` as a Flower App on the Simulation Engine; returns the summary dict.

    The results folder (``out``, else ``config.out``, else ``runs/<run name>``) matches
    ``livar-fed``'s; the same seed gives the same global model and accuracies as the in-process
    engine up to float rounding. ``control``: resume the run in the folder, stop after a round
    (:class:`~livar_merge.flower.server_app.RunControl`).
    """

    check_method(config.method)  # before Ray starts
    folder = Path(out) if out is not None else config.out_dir()
    config = replace(config, out=str(folder), engine="flower")
    control = control or RunControl()
    ServerRun.check_folder(config, control)  # a refused folder fails here, not inside Ray
    summaries: list[dict[str, Any]] = []
    run_simulation(
        server_app=make_server_app(config, settings or FlowerSettings(), control, summaries),
        client_app=client_app,
        num_supernodes=config.num_clients,
        backend_config=backend_config(config),
        verbose_logging=verbose,
    )
    if not summaries:
        raise RoundFailedError(
            f"the Flower simulation of {folder} ended without a summary; see the log above"
        )
    return summaries[0]
