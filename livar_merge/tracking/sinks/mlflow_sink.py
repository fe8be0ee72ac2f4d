"""``--track mlflow``: an MLflow run (``MlflowClient``).

The tracking store is ``$MLFLOW_TRACKING_URI`` if set (a server, a database), else a SQLite
store in the folder (``<folder>/mlflow.db``, artifacts in ``<folder>/mlflow-artifacts``; browse
it with ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``). The experiment is
``$MLFLOW_EXPERIMENT_NAME`` or ``livar``. A resumed run logs into the same MLflow run."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from livar_merge.tracking.base import Tracker, register_tracker

BATCH = 500  # metrics per log_batch call (the REST API takes at most 1,000)


def folder_store(folder: Path) -> str:
    """The tracking URI of the SQLite store in ``folder``."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


@register_tracker
class MlflowTracker(Tracker):
    name = "mlflow"
    package = "mlflow"

    def __init__(
        self, folder: Path, *, title: str, state: Mapping[str, Any] | None, first_step: int
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.folder = folder
        if state:  # the same store and run (the folder's own store follows a moved folder)
            self.store, self.run_id = state["tracking_uri"], str(state["run_id"])
            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.store = env_uri  # None: the folder's SQLite store
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "livar"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None if env_uri else (folder / "mlflow-artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run = self.client.create_run(
            experiment_id, run_name=title, tags={"livar.folder": str(folder.resolve())}
        )
        self.run_id = run.info.run_id

    @property
    def uri(self) -> str:
        """The tracking URI: the given store, or the folder's ``mlflow.db``."""
        return self.store or folder_store(self.folder)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(v), now, step) for tag, v in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        """MLflow has no histograms: the per-layer values are in the attached tables."""

    def text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.store, "run_id": self.run_id}

    def flush(self) -> None:
        """Every call above is written when it returns."""

    def close(self, *, finished: bool) -> None:
        if finished:
            self.client.set_terminated(self.run_id, "FINISHED")
