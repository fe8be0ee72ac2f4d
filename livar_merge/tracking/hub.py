""":class:`Trackers`: the trackers of one folder, kept in step with it.

The folder is the ground truth and the trackers mirror it: after each checkpointed round the run
folder hands its rows to :meth:`Trackers.log_rounds`, which logs every round a tracker has not
logged yet and records that in ``<folder>/trackers.json`` with each tracker's resume state. A
resumed run therefore continues each tracker's run (the same MLflow run, the same TensorBoard
directory with events of a crashed session purged) and logs every round exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from livar_merge._io import read_json_object, write_json
from livar_merge.errors import RunFolderError
from livar_merge.tracking.base import TRACKERS, Tracker, check_trackers
from livar_merge.tracking.records import calibration_scalars, round_histograms, round_scalars

STATE_FILE = "trackers.json"


class Trackers:
    """The trackers ``names`` of ``folder`` (``resume``: continue those recorded there)."""

    def __init__(
        self,
        folder: Path,
        names: Sequence[str],
        *,
        title: str,
        params: Mapping[str, Any],
        resume: bool,
    ) -> None:
        check_trackers(list(names))
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE
        saved: dict[str, Any] = {}
        if resume and self.path.is_file():
            saved = read_json_object(self.path, RunFolderError).get("trackers", {})
        self.last_step = {name: int(saved.get(name, {}).get("last_step", 0)) for name in names}
        self.trackers: dict[str, Tracker] = {}
        for name in names:
            state = saved.get(name, {}).get("state")
            tracker = TRACKERS[name](
                self.folder, title=title, state=state, first_step=self.last_step[name] + 1
            )
            if state is None:
                tracker.params(params)
            self.trackers[name] = tracker
        self._save()

    def _save(self) -> None:
        write_json(
            self.path,
            {
                "trackers": {
                    name: {"state": t.state(), "last_step": self.last_step[name]}
                    for name, t in self.trackers.items()
                }
            },
        )

    def log_rounds(self, rows: Any) -> None:
        """Log each round of ``rows`` (a ``RunRows``) that a tracker has not logged yet."""
        for row in rows.metrics:
            r = int(row["round"])
            todo = [n for n, t in self.trackers.items() if self.last_step[n] < r]
            if not todo:
                continue
            scalars, histograms = round_scalars(rows, r), round_histograms(rows, r)
            for name in todo:
                tracker = self.trackers[name]
                tracker.scalars(r, scalars)
                for tag, values in histograms.items():
                    tracker.histogram(r, tag, values)
                tracker.flush()
                self.last_step[name] = r
        self._save()

    def finish(self, texts: Mapping[str, str], files: Iterable[Path]) -> None:
        """The run is complete: attach ``texts`` and ``files``, end every tracker's run."""
        files = [f for f in files if f.is_file()]
        for tracker in self.trackers.values():
            for tag, text in texts.items():
                tracker.text(tag, text)
            for path in files:
                tracker.artifact(path)
            tracker.close(finished=True)
        self._save()

    def log_calibration(
        self, summary: Mapping[str, Any], texts: Mapping[str, str], files: Iterable[Path]
    ) -> None:
        """A finished calibration: the numbers of its summary, ``texts`` (the table, the quality
        verdict) and ``files`` (table, summary, figures); ends every tracker's run. Step 1 is
        the first analysis; a calibration resumed with other analysis options logs step 2, ..."""
        scalars = calibration_scalars(summary)
        step = max(self.last_step.values(), default=0) + 1
        for name, tracker in self.trackers.items():
            tracker.scalars(step, scalars)
            tracker.flush()
            self.last_step[name] = step
        self.finish(texts, files)

    def close(self) -> None:
        """End this session without finishing (a run stopped early; it may be resumed)."""
        for tracker in self.trackers.values():
            tracker.close(finished=False)
