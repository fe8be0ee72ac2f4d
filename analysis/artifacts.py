"""Read the saved artifacts: calibration run folders and federated run folders.

Nothing here trains or recomputes: a missing or inconsistent file raises
:class:`ArtifactError` whose message is the reason the catalogue prints for a skipped item.

Calibration run folder (``livar-calibrate``): ``rows.csv``, ``shap_values.csv`` (same row
order), ``shap_values_samples.csv`` (with ``num_samples``), ``shap.json`` (base values),
``table/<name>.v<N>.json``, ``config.json``.

Federated run folders (``livar-fed``) are read by their one reader,
:class:`livar_merge.federated.run_layout.RunReader` (its errors are :class:`ArtifactError` s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livar_calib.explain import ShapResult
from livar_merge._io import read_csv, read_json_object
from livar_merge.errors import ArtifactError, TableError
from livar_merge.tables import GShapTable


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{what} has no {path.name}")
    return read_json_object(path, ArtifactError)


def _read_csv(path: Path, what: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    if not path.is_file():
        raise ArtifactError(f"{what} has no {path.name}")
    return read_csv(path, columns, ArtifactError)


@dataclass(frozen=True, eq=False)
class CalibrationRun:
    """A ``livar-calibrate`` run folder; ``name`` labels its dataset in figures."""

    root: Path
    name: str

    @classmethod
    def open(cls, root: str | os.PathLike[str], name: str | None = None) -> CalibrationRun:
        """Open ``root``; ``name`` defaults to the proxy dataset of its ``config.json``."""
        path = Path(root)
        if not path.is_dir():
            raise ArtifactError(f"calibration run folder {path} does not exist")
        if name is None:
            config = cls(path, path.name).config
            name = str(config.get("proxy") or path.name)
        return cls(path, name)

    @property
    def what(self) -> str:
        return f"calibration run {self.root}"

    @cached_property
    def config(self) -> dict[str, Any]:
        """The calibration options (``config.json``'s ``config``); empty if absent."""
        path = self.root / "config.json"
        if not path.is_file():
            return {}
        return dict(_read_json(path, self.what).get("config", {}))

    @cached_property
    def rows(self) -> pd.DataFrame:
        """``rows.csv``: one row per (repeat, client, layer) with ``q_a``, ``q_b``."""
        return _read_csv(self.root / "rows.csv", self.what, ("q_a", "q_b"))

    @cached_property
    def shap_info(self) -> dict[str, Any]:
        """``shap.json`` (base values); empty if absent."""
        path = self.root / "shap.json"
        return _read_json(path, self.what) if path.is_file() else {}

    def shap(self, *, samples: bool = False) -> ShapResult:
        """SHAP values of the forest (``samples``: the forest with ``num_samples``).

        ``data`` holds the explained feature values taken from ``rows.csv``; a missing base
        value reads NaN.
        """
        file = "shap_values_samples.csv" if samples else "shap_values.csv"
        values = _read_csv(self.root / file, self.what)
        if values.empty or values.shape[1] == 0:
            raise ArtifactError(f"{self.root / file} holds no SHAP values")
        rows = self.rows
        if len(rows) != len(values):
            raise ArtifactError(
                f"{self.root / file} has {len(values)} rows but rows.csv {len(rows)}; "
                "they must be in the same order"
            )
        missing = [f for f in values.columns if f not in rows.columns]
        if missing:
            raise ArtifactError(f"rows.csv lacks the explained feature(s) {missing}")
        key = "base_value_samples" if samples else "base_value"
        base = self.shap_info.get(key, self.shap_info.get("base_value", float("nan")))
        features = tuple(str(c) for c in values.columns)
        return ShapResult(
            values=values.astype(np.float64),
            base_value=float(base),
            feature_names=features,
            data=rows.loc[:, list(features)].reset_index(drop=True),
        )

    def table_path(self) -> Path:
        """The run's G_SHAP table (``summary.json``'s, else the highest ``table/*.vN.json``)."""
        summary = self.root / "summary.json"
        if summary.is_file():
            recorded = _read_json(summary, self.what).get("table")
            if recorded:
                for candidate in (Path(recorded), self.root / "table" / Path(recorded).name):
                    if candidate.is_file():
                        return candidate
        found = sorted(
            (self.root / "table").glob("*.v*.json"),
            key=lambda p: (p.name.rsplit(".v", 1)[0], int(p.name.rsplit(".v", 1)[1][:-5])),
        )
        if not found:
            raise ArtifactError(f"{self.what} has no table/<name>.v<N>.json")
        return found[-1]

    def table(self) -> GShapTable:
        """The run's G_SHAP table, loaded and validated."""
        return load_table(self.table_path())


def load_table(name_or_path: str | os.PathLike[str]) -> GShapTable:
    """:meth:`GShapTable.load`, with failures as :class:`ArtifactError`."""
    try:
        return GShapTable.load(name_or_path)
    except TableError as err:
        raise ArtifactError(str(err)) from err


def unique_paths(paths: list[Path]) -> list[Path]:
    """Drop repeated folders (compared after resolving), keeping the first occurrence."""
    seen: set[Path] = set()
    out = []
    for path in paths:
        key = Path(path).resolve()
        if key not in seen:
            seen.add(key)
            out.append(Path(path))
    return out
