"""Command-line options generated from a config dataclass (shared by the livar CLIs).

Each field becomes ``--field-name``; its ``metadata["help"]`` and default make the help text.
Values are parsed by :func:`coerce_option` so config files and the command line agree.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _kind(field_type: Any) -> tuple[str, bool]:
    """``("float", True)`` for ``list[float]``; ``("int", False)`` for ``int | None``."""
    text = str(field_type).split("|")[0].strip()
    if text.startswith("list["):
        return text[5:-1], True
    return text, False


def _nullable(field_type: Any) -> bool:
    return "None" in str(field_type)


def add_dataclass_options(group: Any, cls: type) -> None:
    """Add one option per field of the dataclass ``cls`` to an argparse group (default None)."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind, is_list = _kind(f.type)
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind == "bool":
            group.add_argument(
                flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            group.add_argument(
                flag,
                dest=f.name,
                default=None,
                nargs="+" if is_list else None,
                metavar=kind.upper(),
                help=text,
            )


def coerce_option(cls: type, name: str, value: Any) -> Any:
    """Convert a file or command-line value to the type of field ``name`` of ``cls``.

    ``"none"``/``"null"`` give None for optional fields; booleans accept true/false/1/0/yes/no;
    list fields accept a list or one value.
    """
    by_name = {f.name: f for f in fields(cls)}
    if name not in by_name:
        raise ValueError(f"unknown option {name!r}")
    field_type = by_name[name].type
    kind, is_list = _kind(field_type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if not _nullable(field_type):
            raise ValueError(f"option {name} cannot be None")
        return None
    if is_list:
        if isinstance(value, str):  # "a,b" or "a b" (TOML strings, Flower run-config values)
            value = [item for item in value.replace(",", " ").split() if item]
        items = value if isinstance(value, list | tuple) else [value]
        return [_scalar(name, kind, item) for item in items]
    return _scalar(name, kind, value)


def _scalar(name: str, kind: str, value: Any) -> Any:
    caster = _SCALARS[kind]
    if caster is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option {name} expects true/false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return caster(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"option {name} expects {kind}, got {value!r}") from err


def collect_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user actually gave (non-None) for fields of ``cls``."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if getattr(args, f.name, None) is not None
    }
