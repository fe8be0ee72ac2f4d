"""File I/O of every artifact livar writes or reads back: the one home of atomic writes, JSON and
CSV conventions and file digests.

Every write goes to a temporary file in the target's folder (``.<name>.<random>.tmp``) that is
renamed over the target only once it is complete, so an interrupted run never leaves a half
written file under the real name. Reads name the file in the error they raise.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge.errors import LivarError, RunReadError

if TYPE_CHECKING:
    import pandas as pd
    import torch

CHUNK_BYTES = 1 << 20


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises; the target is replaced only by a
    complete file (``os.replace`` is atomic within one file system). Returns ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(data: Any) -> str:
    """``data`` as livar writes JSON: indented by 2, NumPy scalars and arrays and paths as
    plain values, a final newline."""
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON (:func:`json_text`) atomically."""
    return write_text(path, json_text(data))


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]] | pd.DataFrame, **options: Any
) -> Path:
    """Write rows (mappings with the same keys) or a DataFrame as CSV atomically; ``options``
    go to ``DataFrame.to_csv`` (default ``index=False``)."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    options.setdefault("index", False)
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, **options))


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors as safetensors atomically."""
    from safetensors.torch import save_file

    return atomic_write(
        path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=dict(metadata or {}))
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike[str], error: type[LivarError] = RunReadError) -> Any:
    """The JSON document in ``path``; a missing or malformed file raises ``error`` naming it."""
    file = Path(path)
    if not file.is_file():
        raise error(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{file} is not readable JSON: {err}") from err


def read_json_object(
    path: str | os.PathLike[str], error: type[LivarError] = RunReadError
) -> dict[str, Any]:
    """:func:`read_json` for a file that must hold a JSON object."""
    document = read_json(path, error)
    if not isinstance(document, dict):
        raise error(f"{path} holds a JSON {type(document).__name__}, not an object")
    return document


def read_csv(
    path: str | os.PathLike[str],
    columns: Sequence[str] = (),
    error: type[LivarError] = RunReadError,
) -> pd.DataFrame:
    """The CSV in ``path`` with at least ``columns``; a missing, unparsable or incomplete file
    raises ``error`` naming it (and the missing columns)."""
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise error(f"{file} is missing")
    try:
        frame = pd.read_csv(file)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise error(f"{file} is not a readable CSV: {err}") from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise error(f"{file} lacks column(s) {missing}")
    return frame


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
