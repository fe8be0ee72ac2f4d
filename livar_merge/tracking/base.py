"""The tracker contract and its registry: one class (one file) per experiment tracker.

A :class:`Tracker` mirrors what a run or calibration folder holds; the folder stays the ground
truth. The contract is small: scalars at a step, histograms, text, parameters, files, and the
``state`` it needs to continue the same tracker run when the run is resumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from livar_merge.errors import ConfigError


class Tracker(ABC):
    """One experiment tracker for one folder.

    Args:
        folder: the run or calibration folder being mirrored (trackers that write files keep
            them under it unless told otherwise).
        title: the run's name in the tracker.
        state: what :meth:`state` returned for this folder before (None: a new tracker run).
        first_step: the first step this session logs (a resumed run: the one after the last
            step logged); trackers that can drop events from a crashed session do so from here.
    """

    name: ClassVar[str]
    package: ClassVar[str]  # the pip package that provides it

    @abstractmethod
    def __init__(
        self, folder: Path, *, title: str, state: Mapping[str, Any] | None, first_step: int
    ) -> None: ...

    @abstractmethod
    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log scalar ``values`` (tag -> number) at ``step``."""

    @abstractmethod
    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        """Log the distribution of ``values`` at ``step`` (trackers without histograms skip)."""

    @abstractmethod
    def text(self, tag: str, text: str) -> None:
        """Log a text (markdown) under ``tag``."""

    @abstractmethod
    def params(self, params: Mapping[str, Any]) -> None:
        """Log the run's options once (first session only)."""

    @abstractmethod
    def artifact(self, path: Path) -> None:
        """Attach the file ``path``."""

    def state(self) -> dict[str, Any]:
        """What resuming needs (kept in the folder's ``trackers.json``)."""
        return {}

    @abstractmethod
    def flush(self) -> None:
        """Make everything logged so far durable."""

    @abstractmethod
    def close(self, *, finished: bool) -> None:
        """End this session (``finished``: the run is complete)."""


TRACKERS: dict[str, type[Tracker]] = {}


def register_tracker(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make ``cls`` available as ``--track <cls.name>``."""
    TRACKERS[cls.name] = cls
    return cls


def check_trackers(
    names: list[str] | tuple[str, ...], *, importer: Callable[[str], Any] | None = None
) -> None:
    """Refuse unknown tracker names, repeats, and trackers whose package is not installed,
    before anything runs."""
    import importlib

    from livar_merge.tracking import sinks  # noqa: F401 (registers the trackers)

    importer = importer or importlib.import_module
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"option track: unknown tracker {name!r}; available: {sorted(TRACKERS)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"option track lists a tracker twice: {list(names)}")
    for name in names:
        module = TRACKERS[name].package
        try:
            importer(module)
        except ImportError as err:
            raise ConfigError(
                f"option track: {name!r} needs the {module!r} package ({err}); install the "
                "track extra: pip install 'livar[track]'"
            ) from err
