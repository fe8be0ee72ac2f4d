"""Per-repeat LoRA deltas of the calibration runs, stored as safetensors.

A *repeat* is one round of one (beta, seed) proxy run: ``M`` clients and one joint model trained
from the same start (paper Sec. 4.1). For every LoRA layer ``l`` it holds each client's round delta
``dW_m^l = U_m^l @ V_m^l`` (``U [d, R_m]``, ``V [R_m, k]``, LoRA scaling already folded in) and the
joint model's delta ``dW_joint^l`` in the same form. These are the inputs of the per-layer NNLS
(Eq. 4) that gives the target coefficients lambda_m^l.

File layout (one ``.safetensors`` file per repeat):

* tensors ``client/{m}/{layer}/U`` and ``client/{m}/{layer}/V`` for client index ``m``
  (0-based position in ``clients``) and ``joint/{layer}/U``, ``joint/{layer}/V``;
* metadata (strings): ``format = "livar-repeat-deltas"``, ``format_version = "1"``, and
  ``repeat_id``, ``layers``, ``clients`` (the last two JSON lists of strings).

Client indices rather than ids appear in the keys, so ids may contain any character.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livar_merge._io import atomic_write
from livar_merge.errors import CalibrationError

FORMAT = "livar-repeat-deltas"
FORMAT_VERSION = "1"

Factors = tuple[np.ndarray, np.ndarray]


@dataclass
class RepeatDeltas:
    """LoRA round deltas of one calibration repeat, in low-rank form.

    Attributes:
        repeat_id: identifies the repeat (e.g. ``"beta0.1-seed3-round2"``).
        layers: LoRA layer names, in order.
        clients: client ids, in order.
        client_factors: ``layer -> [(U [d, R_m], V [R_m, k]) for each client]``, ``dW_m = U @ V``.
        joint_factors: ``layer -> (U [d, R_j], V [R_j, k])`` of the joint model's delta.
    """

    repeat_id: str
    layers: list[str]
    clients: list[str]
    client_factors: dict[str, list[Factors]]
    joint_factors: dict[str, Factors]

    def validate(self, where: str | None = None) -> None:
        """Check names, factor shapes and finiteness; raise :class:`CalibrationError` if bad."""
        validate_repeat(self, where=where or f"repeat {self.repeat_id!r}")


def client_key(m: int, layer: str, which: str) -> str:
    """Tensor key of client ``m``'s ``which`` ("U" or "V") factor of ``layer``."""
    return f"client/{m}/{layer}/{which}"


def joint_key(layer: str, which: str) -> str:
    """Tensor key of the joint model's ``which`` ("U" or "V") factor of ``layer``."""
    return f"joint/{layer}/{which}"


def _check_factors(factors: Any, what: str, prefix: str, where: str) -> tuple[int, int]:
    """Validate the ``(U, V)`` pair stored under ``{prefix}/U``, ``{prefix}/V``; return (d, k)."""
    if not (isinstance(factors, tuple | list) and len(factors) == 2):
        raise CalibrationError(f"{where}: {what} must be a (U, V) pair, got {type(factors)}")
    u, v = (np.asarray(f) for f in factors)
    for name, f in (("U", u), ("V", v)):
        if f.ndim != 2:
            raise CalibrationError(
                f"{where}: tensor {prefix}/{name} ({what}) must be 2-D, got shape {f.shape}"
            )
        if not np.issubdtype(f.dtype, np.floating):
            raise CalibrationError(
                f"{where}: tensor {prefix}/{name} ({what}) has dtype {f.dtype}, not floating"
            )
        if not np.all(np.isfinite(f)):
            raise CalibrationError(f"{where}: tensor {prefix}/{name} ({what}) holds NaN or Inf")
    if u.shape[1] != v.shape[0]:
        raise CalibrationError(
            f"{where}: tensors {prefix}/U {u.shape} and {prefix}/V {v.shape} ({what}): inner "
            "ranks differ (expected U [d, R], V [R, k])"
        )
    return int(u.shape[0]), int(v.shape[1])


def validate_repeat(deltas: RepeatDeltas, *, where: str) -> None:
    """Check that every layer has one (U, V) per client and one joint pair, shapes agreeing."""
    if not deltas.layers or not deltas.clients:
        raise CalibrationError(f"{where}: needs at least one layer and one client")
    for what, names in (("layers", deltas.layers), ("clients", deltas.clients)):
        if not all(isinstance(n, str) and n for n in names):
            raise CalibrationError(f"{where}: {what} must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise CalibrationError(f"{where}: duplicated names in {what}: {names!r}")
    for extra_dict, what in ((deltas.client_factors, "client"), (deltas.joint_factors, "joint")):
        extra = sorted(set(extra_dict) - set(deltas.layers))
        if extra:
            raise CalibrationError(f"{where}: {what} factors for unknown layers {extra}")
    for layer in deltas.layers:
        if layer not in deltas.joint_factors:
            raise CalibrationError(f"{where}: no joint factors for layer {layer!r}")
        shape = _check_factors(
            deltas.joint_factors[layer], f"joint, layer {layer!r}", f"joint/{layer}", where
        )
        per_client = deltas.client_factors.get(layer)
        if per_client is None or len(per_client) != len(deltas.clients):
            got = "none" if per_client is None else len(per_client)
            raise CalibrationError(
                f"{where}: layer {layer!r} needs {len(deltas.clients)} client factor pairs, "
                f"got {got}"
            )
        for m, factors in enumerate(per_client):
            what = f"client {m} ({deltas.clients[m]!r}), layer {layer!r}"
            got_shape = _check_factors(factors, what, f"client/{m}/{layer}", where)
            if got_shape != shape:
                raise CalibrationError(
                    f"{where}: tensors client/{m}/{layer}/U,V ({what}): delta shape {got_shape} "
                    f"differs from the joint delta's {shape}"
                )


def save_repeat(path: str | os.PathLike[str], deltas: RepeatDeltas) -> Path:
    """Write ``deltas`` to ``path`` (safetensors), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    deltas.validate(where=f"repeat {deltas.repeat_id!r} (saving to {path})")
    tensors: dict[str, np.ndarray] = {}
    for layer in deltas.layers:
        for m, (u, v) in enumerate(deltas.client_factors[layer]):
            tensors[client_key(m, layer, "U")] = np.ascontiguousarray(u)
            tensors[client_key(m, layer, "V")] = np.ascontiguousarray(v)
        u, v = deltas.joint_factors[layer]
        tensors[joint_key(layer, "U")] = np.ascontiguousarray(u)
        tensors[joint_key(layer, "V")] = np.ascontiguousarray(v)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "repeat_id": deltas.repeat_id,
        "layers": json.dumps(list(deltas.layers)),
        "clients": json.dumps(list(deltas.clients)),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _metadata_list(metadata: dict[str, str], key: str, where: str) -> list[str]:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise CalibrationError(f"{where}: metadata has no {key!r}") from None
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{where}: metadata {key!r} is not JSON: {err.msg}") from err
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CalibrationError(f"{where}: metadata {key!r} must be a JSON list of strings")
    return value


def load_repeat(path: str | os.PathLike[str]) -> RepeatDeltas:
    """Read a file written by :func:`save_repeat`; validate keys, shapes and values.

    Raises :class:`CalibrationError` naming the file and the missing/unexpected/bad key.
    """
    from safetensors import safe_open

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CalibrationError(f"{where}: repeat file does not exist")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except CalibrationError:
        raise
    except Exception as err:  # safetensors raises its own error types (and OSError)
        raise CalibrationError(
            f"{where}: not a readable safetensors file ({type(err).__name__}: {err})"
        ) from err
    if metadata.get("format") != FORMAT:
        raise CalibrationError(
            f"{where}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(
            f"{where}: unsupported format_version {metadata.get('format_version')!r}; "
            f"this livar reads {FORMAT_VERSION!r}"
        )
    if "repeat_id" not in metadata:
        raise CalibrationError(f"{where}: metadata has no 'repeat_id'")
    layers = _metadata_list(metadata, "layers", where)
    clients = _metadata_list(metadata, "clients", where)
    expected = {joint_key(layer, w) for layer in layers for w in "UV"}
    expected |= {
        client_key(m, layer, w) for layer in layers for m in range(len(clients)) for w in "UV"
    }
    missing = sorted(expected - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CalibrationError(f"{where}: missing tensor {missing[0]!r}{more}")
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CalibrationError(f"{where}: unexpected tensor {unexpected[0]!r}{more}")
    deltas = RepeatDeltas(
        repeat_id=metadata["repeat_id"],
        layers=layers,
        clients=clients,
        client_factors={
            layer: [
                (tensors[client_key(m, layer, "U")], tensors[client_key(m, layer, "V")])
                for m in range(len(clients))
            ]
            for layer in layers
        },
        joint_factors={
            layer: (tensors[joint_key(layer, "U")], tensors[joint_key(layer, "V")])
            for layer in layers
        },
    )
    deltas.validate(where=where)
    return deltas
