"""CIFAR python batches: pickled dicts read with an unpickler restricted to numpy globals."""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

from livar_merge.errors import DatasetError
from livar_merge.federated.datasets.formats.folders import need_file
from livar_merge.federated.datasets.registry import dataset_error

_DATASET = "cifar100"

_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes objects in protocol-2 pickles written by Python 3
    }
)


def _numpy_global(module: str, name: str) -> Any:
    """A numpy global, mapping numpy.core <-> numpy._core to whichever this numpy has."""
    if importlib.util.find_spec("numpy._core") is not None:
        module = module.replace("numpy.core.", "numpy._core.")
    else:  # pragma: no cover - numpy < 2
        module = module.replace("numpy._core.", "numpy.core.")
    return getattr(importlib.import_module(module), name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array-reconstruction globals; refuses the rest."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 str/array data of CIFAR
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global ``module.name``; a DatasetError for any other."""
        if (module, name) not in _PICKLE_ALLOWED:
            raise DatasetError(
                f"{_DATASET}: refusing to unpickle {self._path}: it references the global "
                f"{module}.{name}, which is not a numpy array-reconstruction global "
                "(a CIFAR pickle holds only dicts, lists and numpy arrays)"
            )
        if module == "_codecs":
            return codecs.encode
        return _numpy_global(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR python batch: dict with keys normalised to str (bytes keys decoded)."""
    need_file(_DATASET, path, f"the CIFAR-100 python batch {path.name}")
    try:
        with path.open("rb") as handle:
            obj = RestrictedUnpickler(handle, path).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise dataset_error(
            _DATASET, f"{path} is not a readable pickle: {exc}", hint=False
        ) from exc
    if not isinstance(obj, dict):
        raise dataset_error(
            _DATASET, f"{path} holds a {type(obj).__name__}, expected a dict", hint=False
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
