"""The Ray engine of ``livar-calibrate`` and ``livar-sweep``: independent runs as Ray tasks.

Each independent run (a calibration's (beta, seed) proxy training, a sweep's ``livar-fed`` run)
is one :class:`FolderTask`: a picklable ``work(folder)`` generator that writes a run folder and
yields after each checkpoint (a proxy round, a finished run). On the ray engine the driver
ships the folder's current files to a task, the task runs ``work`` in a scratch folder of its
own node and streams back, at every yield, the files written since the last one (and what it
deleted); the driver writes them into the real folder in the task's order. Worker nodes thus
need no shared filesystem, the folder ends up as the serial engine leaves it, and a rerun after
an interruption resumes from what the driver received (per round for a calibration, per run for
a sweep). Ray is imported only when the engine is ``ray`` (:class:`EngineUnavailableError` when
it is not installed). The engine options never enter a config or training hash.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from livar_merge._options import coerce_option, collect_overrides, option
from livar_merge.errors import EngineUnavailableError

Work = Callable[[Path], Iterable[Any]]


@dataclass
class EngineOptions:
    """How the independent runs of ``livar-calibrate``/``livar-sweep`` are executed."""

    engine: Literal["serial", "ray"] = option(
        "serial",
        "'serial' (independent runs one after another in this process) or 'ray' (each run a "
        "Ray task; results come back through Ray, no shared filesystem needed)",
    )
    ray_address: str | None = option(
        None, "Ray cluster to join ('auto' or an address; default: start a local Ray)"
    )
    ray_gpus_per_task: float = option(0.0, "GPUs reserved per Ray task (--engine ray)", ge=0)
    ray_cpus_per_task: float = option(1.0, "CPU cores reserved per Ray task (--engine ray)", gt=0)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The :class:`EngineOptions` given on a command line (``add_dataclass_options``)."""
    given = collect_overrides(args, EngineOptions)
    return EngineOptions(**{k: coerce_option(EngineOptions, k, v) for k, v in given.items()})


def import_ray() -> Any:
    """The ``ray`` module; :class:`EngineUnavailableError` when it is not installed."""
    try:
        import ray
    except ImportError as err:
        raise EngineUnavailableError(
            f"--engine ray needs the ray package (pip install 'livar[flower]'): {err}"
        ) from err
    return ray


@dataclass(frozen=True)
class FolderTask:
    """One independent run: ``work(folder)`` writes ``folder`` and yields after each checkpoint
    (a module-level function or a ``functools.partial`` of one, so that Ray can pickle it)."""

    name: str
    folder: Path
    work: Work


@dataclass
class FolderChange:
    """What a task wrote since its last report: file contents (in the order they were written),
    deleted files and folders, new (empty) folders."""

    files: dict[str, bytes] = field(default_factory=dict)
    removed_files: list[str] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)
    new_dirs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.files or self.removed_files or self.removed_dirs or self.new_dirs)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative POSIX path (empty for a missing folder)."""
    if not folder.is_dir():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".ray-tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def apply_change(folder: Path, change: FolderChange) -> None:
    """Write a task's :class:`FolderChange` into ``folder``, as the task's own writes did."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in change.new_dirs:
        (folder / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in change.files.items():
        _write_atomic(folder / rel, data)
    for rel in change.removed_files:
        (folder / rel).unlink(missing_ok=True)
    for rel in change.removed_dirs:
        shutil.rmtree(folder / rel, ignore_errors=True)


class FolderTracker:
    """Reports the changes of a folder since the previous report (by size, mtime and inode)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files, self.dirs = self._scan()

    def _scan(self) -> tuple[dict[str, tuple[int, int, int]], set[str]]:
        files, dirs = {}, set()
        for path in self.folder.rglob("*"):
            rel = path.relative_to(self.folder).as_posix()
            if path.is_dir():
                dirs.add(rel)
            elif path.is_file():
                stat = path.stat()
                files[rel] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        return files, dirs

    def changes(self) -> FolderChange:
        files, dirs = self._scan()
        changed = sorted(
            (rel for rel, sig in files.items() if self.files.get(rel) != sig),
            key=lambda rel: (files[rel][1], rel),  # the order the task wrote them
        )
        gone = self.dirs - dirs
        gone_dirs = sorted(d for d in gone if not _under(d, gone))
        change = FolderChange(
            files={rel: (self.folder / rel).read_bytes() for rel in changed},
            removed_files=sorted(
                rel for rel in self.files if rel not in files and not _under(rel, gone_dirs)
            ),
            removed_dirs=gone_dirs,
            new_dirs=sorted(dirs - self.dirs),
        )
        self.files, self.dirs = files, dirs
        return change


def _under(rel: str, dirs: Iterable[str]) -> bool:
    return any(rel.startswith(d + "/") for d in dirs)


def run_in_scratch(
    work: Work, files: dict[str, bytes], context: dict[str, Any]
) -> Iterator[tuple[Any, FolderChange]]:
    """The body of a Ray task: unpack ``files`` into a scratch folder, run ``work`` there and
    yield ``(report, change)`` after each of its checkpoints (then one last change, if any).
    Runs in the driver's working directory and with its ``sys.argv`` where the node has it,
    so relative paths and the recorded command line are the serial engine's."""
    cwd, argv = os.getcwd(), sys.argv
    if Path(context["cwd"]).is_dir():
        os.chdir(context["cwd"])
    sys.argv = list(context["argv"])
    try:
        with tempfile.TemporaryDirectory(prefix="livar-ray-") as tmp:
            folder = Path(tmp) / "run"
            folder.mkdir()
            for rel, data in files.items():
                _write_atomic(folder / rel, data)
            tracker = FolderTracker(folder)
            for report in work(folder):
                yield report, tracker.changes()
            last = tracker.changes()
            if last:
                yield None, last
    finally:
        os.chdir(cwd)
        sys.argv = argv


def connect(options: EngineOptions) -> bool:
    """Join ``options.ray_address`` or start a local Ray, unless Ray is already initialised
    in this process; True when this call initialised it (the caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(address=options.ray_address, include_dashboard=False)
    return True


def run_folder_tasks(
    tasks: Iterable[FolderTask],
    options: EngineOptions,
    *,
    on_report: Callable[[FolderTask, Any], None] | None = None,
) -> None:
    """Run ``tasks`` as Ray tasks, writing each one's streamed changes into its folder;
    ``on_report(task, report)`` after each checkpoint. The first failing task's error is
    raised (the others are cancelled); what was received so far stays written."""
    tasks = list(tasks)
    if not tasks:
        return
    ray = import_ray()
    started = connect(options)
    try:
        remote = ray.remote(run_in_scratch).options(
            num_cpus=options.ray_cpus_per_task,
            num_gpus=options.ray_gpus_per_task,
            num_returns="streaming",
        )
        context = {"cwd": os.getcwd(), "argv": list(sys.argv)}
        pending: dict[Any, FolderTask] = {}
        for task in tasks:
            files = ray.put(folder_files(task.folder))
            pending[remote.remote(task.work, files, context)] = task
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for generator in ready:
                    task = pending[generator]
                    try:
                        ref = next(generator)
                    except StopIteration:
                        del pending[generator]
                        continue
                    report, change = ray.get(ref)
                    apply_change(task.folder, change)
                    if report is not None and on_report is not None:
                        on_report(task, report)
        except BaseException:
            for generator in pending:
                ray.cancel(generator)
            raise
    finally:
        if started:
            ray.shutdown()
