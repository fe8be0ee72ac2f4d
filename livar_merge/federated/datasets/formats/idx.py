"""The idx ubyte format of (Fashion-)MNIST, raw or gzipped."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from livar_merge.errors import DatasetError

_IDX_MAGIC = {3: 2051, 1: 2049}  # ubyte (0x08) files: images idx3, labels idx1


def read_bytes(path: Path) -> bytes:
    """File contents, gunzipped if they start with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data: {exc}") from exc
    if path.suffix == ".gz":
        raise DatasetError(f"{path}: named .gz but is not gzip data")
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx ubyte file (raw or gzip) -> uint8 array of its dims; header fully validated.

    Header: two zero bytes, type code 0x08 (ubyte), ndim, then ndim big-endian uint32 dims.
    """
    path = Path(path)
    raw = read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated idx header ({len(raw)} bytes, need at least 4)")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = _IDX_MAGIC.get(ndim, 0x0800 + ndim)
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: bad idx magic number {magic} (0x{magic:08x}) in bytes 0-3; expected "
            f"{expected_magic} (0x{expected_magic:08x}: ubyte data with {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path}: truncated idx header ({len(raw)} bytes, need {header} for {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if any(d == 0 for d in dims[1:]):
        raise DatasetError(f"{path}: idx header dims {dims} contain a zero item dimension")
    expected = math.prod(dims)
    body = len(raw) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {kind}: header dims {dims} need {expected} data bytes after the "
            f"{header}-byte header, file has {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def idx_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` or ``folder/base.gz``, whichever exists (raw first)."""
    return next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)
