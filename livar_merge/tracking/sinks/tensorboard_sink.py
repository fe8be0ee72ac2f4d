"""``--track tensorboard``: event files under ``<folder>/tensorboard`` (torch's SummaryWriter).

A resumed run writes into the same directory with ``purge_step`` at its first new step, so
events a crashed session wrote after the last recorded step are dropped by every reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from livar_merge.tracking.base import Tracker, register_tracker


@register_tracker
class TensorBoardTracker(Tracker):
    name = "tensorboard"
    package = "tensorboard"

    def __init__(
        self, folder: Path, *, title: str, state: Mapping[str, Any] | None, first_step: int
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.relative = Path(state["log_dir"]) if state else Path("tensorboard")
        self.log_dir = folder / self.relative  # absolute if it was given so
        self.writer = SummaryWriter(
            log_dir=str(self.log_dir), purge_step=first_step if state else None
        )
        self.title = title

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text(
            "options", f"**{self.title}**\n\n| option | value |\n|---|---|\n{rows}"
        )

    def artifact(self, path: Path) -> None:
        """TensorBoard keeps no files; the run folder has them."""

    def state(self) -> dict[str, Any]:
        return {"log_dir": str(self.relative)}

    def flush(self) -> None:
        self.writer.flush()

    def close(self, *, finished: bool) -> None:
        self.writer.close()
