"""Versioned G_SHAP tables (paper Eq. 5 and Appendix A).

A table maps the quantile bin of a (client, layer)'s omega_B (rows) and omega_A (columns) to an
un-normalised merging coefficient. Tables are JSON documents validated against
``schemas/gshap-table.schema.json`` and protected by a SHA-256 checksum of their canonical form.

Names resolve against a search path: the directories in ``$LIVAR_GSHAP_PATH`` (``os.pathsep``
separated), the tables installed with the package, and ``artifacts/gshap/`` of a source checkout.
``"paper-table-a"`` picks the highest version; ``"paper-table-a.v1"`` (or ``"paper-table-a@1"``)
a given one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from livar_merge import __version__
from livar_merge._io import write_text
from livar_merge.errors import TableError

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
_NAME_VERSION = re.compile(r"^(?P<name>.+?)(?:\.v|@)(?P<version>\d+)$")
_FILE_NAME = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.json$")


def _schema() -> dict[str, Any]:
    text = resources.files("livar_merge").joinpath("schemas/gshap-table.schema.json").read_text()
    return json.loads(text)


def canonical_json(document: dict[str, Any]) -> str:
    """Canonical serialisation used for checksums: sorted keys, no whitespace, ASCII."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_checksum(document: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``document`` without its ``checksum`` field."""
    body = {k: v for k, v in document.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def table_search_path() -> list[Path]:
    """Directories searched, in order, when a table is given by name."""
    dirs = [Path(p) for p in os.environ.get("LIVAR_GSHAP_PATH", "").split(os.pathsep) if p]
    installed = Path(str(resources.files("livar_merge"))) / "_tables"
    checkout = Path(__file__).resolve().parent.parent / "artifacts" / "gshap"
    dirs += [d for d in (installed, checkout) if d.is_dir()]
    return dirs


def table_file_name(name: str, version: int) -> str:
    """File name of version ``version`` of table ``name``: ``<name>.v<version>.json``."""
    return f"{name}.v{version}.json"


def _version_files(directory: str | os.PathLike[str], name: str) -> list[tuple[int, Path]]:
    """``(version, path)`` of every file ``<name>.v<N>.json`` in ``directory``, by version."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(
        (int(m["version"]), path)
        for path in folder.iterdir()
        if (m := _FILE_NAME.match(path.name)) and m["name"] == name
    )


def existing_versions(directory: str | os.PathLike[str], name: str) -> list[int]:
    """Versions of table ``name`` with a file ``<name>.v<N>.json`` in ``directory`` (sorted;
    empty when the directory does not exist)."""
    return [version for version, _ in _version_files(directory, name)]


def available_tables() -> dict[str, list[int]]:
    """Names of the tables on the search path and their versions."""
    found: dict[str, set[int]] = {}
    for directory in table_search_path():
        for path in directory.glob("*.v*.json"):
            match = _FILE_NAME.match(path.name)
            if match:
                found.setdefault(match["name"], set()).add(int(match["version"]))
    return {name: sorted(versions) for name, versions in sorted(found.items())}


def resolve_table_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a table name (optionally with version) or a file path into an existing file path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.exists():
        if not candidate.is_file():
            raise TableError(f"G_SHAP table file {candidate} does not exist")
        return candidate
    text = str(name_or_path)
    match = _NAME_VERSION.match(text)
    name, version = (match["name"], int(match["version"])) if match else (text, None)
    search = table_search_path()
    for directory in search:
        if version is not None and (directory / table_file_name(name, version)).is_file():
            return directory / table_file_name(name, version)
    if version is None:
        latest = [found[-1] for directory in search if (found := _version_files(directory, name))]
        if latest:  # the highest version; on a tie the first directory of the search path
            return max(latest, key=lambda item: item[0])[1]
    known = ", ".join(f"{n} (v{'/v'.join(map(str, v))})" for n, v in available_tables().items())
    where = ", ".join(str(d) for d in search) or "<empty search path>"
    raise TableError(
        f"no G_SHAP table named {text!r} in {where}; available: {known or 'none'}. "
        "Pass a file path or add its directory to $LIVAR_GSHAP_PATH."
    )


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def assign_bins(values: npt.ArrayLike, edges: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Bin index of each value given increasing cut points ``edges`` (``K-1`` edges, ``K`` bins).

    The rule generalises the paper's Table A (``Q < 25``, ``25 <= Q <= 50``, ``Q > 50``) and the
    released code: the outer bins are open (``v < e_1`` is bin 0, ``v > e_{K-1}`` is bin ``K-1``)
    and everything from ``e_1`` to ``e_{K-1}`` inclusive is interior, with interior cut points
    closing the bin below them (``e_i < v <= e_{i+1}``). So a value exactly on a boundary lands
    in the middle bin of a 3-bin table. With a single edge (2 bins) a value on it goes up.
    Tied edges (all omegas equal) put every value in the interior bin next to bin 0.
    """
    v = np.asarray(values, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if e.size == 0:
        return np.zeros(v.shape, dtype=np.int64)
    bins = np.searchsorted(e, v, side="left")  # number of edges strictly below v
    return np.where(v == e[0], 1, bins).astype(np.int64)


@dataclass(frozen=True, eq=False)
class GShapTable:
    """A discretised G_SHAP function: ``values[b, a]`` for Q_B bin ``b`` and Q_A bin ``a``.

    Attributes:
        name, version: identity; files are named ``<name>.v<version>.json``.
        edges_a, edges_b: percentiles (0-100) cutting the pooled omega_A / omega_B into bins.
        values: array ``[len(edges_b) + 1, len(edges_a) + 1]`` of positive coefficients.
        base_value: the SHAP base value the cells were built from (``None`` if unpublished).
        provenance: source, proxy dataset, backbone, date, tool version, config hash, ...
        description: free text.
    """

    name: str
    version: int
    edges_a: tuple[float, ...]
    edges_b: tuple[float, ...]
    values: npt.NDArray[np.float64]
    base_value: float | None
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source_path: Path | None = None

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64)
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "edges_a", tuple(float(e) for e in self.edges_a))
        object.__setattr__(self, "edges_b", tuple(float(e) for e in self.edges_b))
        validate_document(self.to_document(), where=f"table {self.name!r}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> GShapTable:
        """Load and validate a table by name (see module docstring) or by file path."""
        path = resolve_table_path(name_or_path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise TableError(f"cannot read G_SHAP table {path}: {err}") from err
        except json.JSONDecodeError as err:
            raise TableError(
                f"G_SHAP table {path} is not valid JSON (line {err.lineno}, column {err.colno}): "
                f"{err.msg}"
            ) from err
        return cls.from_document(document, where=str(path), source_path=path)

    @classmethod
    def from_document(
        cls, document: Any, *, where: str = "<document>", source_path: Path | None = None
    ) -> GShapTable:
        """Build a table from a parsed JSON document, validating schema and checksum."""
        validate_document(document, where=where)
        return cls(
            name=document["name"],
            version=document["version"],
            edges_a=document["quantile_edges"]["A"],
            edges_b=document["quantile_edges"]["B"],
            values=np.asarray(document["values"], dtype=np.float64),
            base_value=document["base_value"],
            provenance=dict(document["provenance"]),
            description=document.get("description", ""),
            source_path=source_path,
        )

    def to_document(self, *, with_checksum: bool = True) -> dict[str, Any]:
        """The JSON document of this table (checksum included by default)."""
        document: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": int(self.version),
            "description": self.description,
            "quantile_edges": {"A": list(self.edges_a), "B": list(self.edges_b)},
            "values": self.values.tolist(),
            "base_value": self.base_value,
            "provenance": dict(self.provenance),
        }
        if with_checksum:
            document["checksum"] = content_checksum(document)
        return document

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the table as JSON. Refuses to replace an existing file unless ``overwrite``."""
        path = Path(path)
        if path.is_dir():
            path = path / self.file_name
        if path.exists() and not overwrite:
            raise TableError(f"{path} exists; tables are immutable: bump the version instead")
        return write_text(path, json.dumps(self.to_document(), indent=2) + "\n")

    # ------------------------------------------------------------ accessors
    @property
    def file_name(self) -> str:
        return table_file_name(self.name, self.version)

    @property
    def checksum(self) -> str:
        return content_checksum(self.to_document(with_checksum=False))

    @property
    def shape(self) -> tuple[int, int]:
        """``(number of Q_B bins, number of Q_A bins)``."""
        rows, cols = self.values.shape
        return rows, cols

    def identity(self) -> dict[str, Any]:
        """Name, version and checksum: what run provenance records about the table."""
        return {"name": self.name, "version": self.version, "checksum": self.checksum}

    def bin_labels(self, which: str) -> list[str]:
        """Human-readable labels of the bins of ``which`` in {"A", "B"}, e.g. ``Q_A<25``."""
        edges = self.edges_a if which == "A" else self.edges_b
        q = f"Q_{which}"
        if not edges:
            return [f"{q}: all"]
        fmt = [f"{e:g}" for e in edges]
        labels = [f"{q}<{fmt[0]}"]
        for i in range(len(edges) - 1):
            low = "<=" if i == 0 else "<"
            labels.append(f"{fmt[i]}{low}{q}<={fmt[i + 1]}")
        labels.append(f"{q}>{fmt[-1]}")
        return labels

    def to_dataframe(self) -> pd.DataFrame:
        """Values as a DataFrame: rows are Q_B bins, columns Q_A bins, labelled with the edges."""
        import pandas as pd

        return pd.DataFrame(
            self.values.copy(),
            index=pd.Index(self.bin_labels("B"), name="omega_B bin"),
            columns=pd.Index(self.bin_labels("A"), name="omega_A bin"),
        )

    def lookup(self, omega_a_quantile: float, omega_b_quantile: float) -> float:
        """Table value for a point given as percentiles (0-100) of omega_A and omega_B."""
        a = int(assign_bins(np.array([omega_a_quantile]), np.array(self.edges_a))[0])
        b = int(assign_bins(np.array([omega_b_quantile]), np.array(self.edges_b))[0])
        return float(self.values[b, a])

    def __repr__(self) -> str:
        frame = self.to_dataframe().to_string(float_format=lambda v: f"{v:.8g}")
        base = "unpublished" if self.base_value is None else f"{self.base_value:g}"
        prov = self.provenance
        return (
            f"GShapTable {self.name} v{self.version} ({self.checksum[:19]}...)\n"
            f"  source: {prov.get('source', '?')}; proxy: {prov.get('proxy_dataset', '?')}; "
            f"backbone: {prov.get('backbone', '?')}; base value: {base}\n"
            + "\n".join("  " + line for line in frame.splitlines())
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GShapTable) and self.to_document() == other.to_document()

    __hash__ = None  # type: ignore[assignment]


def validate_document(document: Any, *, where: str = "<document>") -> None:
    """Check a parsed table document: schema version, JSON Schema, shapes, checksum.

    Raises ``TableError`` naming ``where`` (usually the file) and the offending field.
    """
    import jsonschema

    if not isinstance(document, dict):
        raise TableError(f"{where}: a G_SHAP table must be a JSON object, got {type(document)}")
    version = document.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise TableError(
            f"{where}: unsupported schema_version {version!r}; this livar reads "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}"
        )
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        field_path = "/".join(str(p) for p in err.absolute_path) or "<root>"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise TableError(f"{where}: field {field_path}: {err.message}{more}")
    _check_semantics(document, where=where)
    expected = content_checksum(document)
    if document["checksum"] != expected:
        raise TableError(
            f"{where}: field checksum: {document['checksum']} does not match the content "
            f"({expected}); the file was edited or corrupted"
        )


def _check_semantics(document: dict[str, Any], *, where: str) -> None:
    """Checks JSON Schema cannot express: increasing edges, grid shape, finiteness."""
    for key in ("A", "B"):
        edges = document["quantile_edges"][key]
        if any(not (0 < e < 100) for e in edges):
            raise TableError(
                f"{where}: field quantile_edges/{key}: percentiles must be in (0, 100)"
            )
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise TableError(
                f"{where}: field quantile_edges/{key}: edges must be strictly increasing, "
                f"got {edges}"
            )
    values = document["values"]
    rows, cols = len(document["quantile_edges"]["B"]) + 1, len(document["quantile_edges"]["A"]) + 1
    if len(values) != rows or any(len(row) != cols for row in values):
        got = f"{len(values)} rows of lengths {[len(r) for r in values]}"
        raise TableError(
            f"{where}: field values: expected {rows} rows (Q_B bins) x {cols} columns (Q_A bins) "
            f"from the quantile edges, got {got}"
        )
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise TableError(f"{where}: field values/{i}/{j}: {v!r} is not a positive number")
    base = document.get("base_value")
    if base is not None and not math.isfinite(base):
        raise TableError(f"{where}: field base_value: {base!r} is not finite")


def make_table(
    name: str,
    version: int,
    values: Sequence[Sequence[float]] | np.ndarray,
    *,
    edges_a: Sequence[float] = (25.0, 50.0),
    edges_b: Sequence[float] = (60.0, 80.0),
    base_value: float | None = None,
    provenance: dict[str, Any] | None = None,
    description: str = "",
) -> GShapTable:
    """Convenience constructor filling provenance fields a table must carry."""
    prov = {
        "source": "user",
        "proxy_dataset": "",
        "backbone": "",
        "date": "",
        "tool_version": f"livar {__version__}",
        "config_hash": None,
    }
    prov.update(provenance or {})
    return GShapTable(
        name=name,
        version=version,
        edges_a=tuple(edges_a),
        edges_b=tuple(edges_b),
        values=np.asarray(values, dtype=np.float64),
        base_value=base_value,
        provenance=prov,
        description=description,
    )
