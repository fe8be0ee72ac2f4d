"""Options declared once on a config dataclass (shared by the livar CLIs, config files, Flower).

A field declared with :func:`option` carries its help text and its bounds (``ge``, ``gt``,
``le``, ``lt``); a ``Literal[...]`` annotation gives its choices. From that one declaration
come the ``--field-name`` flags (with argparse ``choices``), :func:`coerce_option` for values
from config files and Flower run configs, and :func:`check_dataclass` for a built config, so
every source of a value gets the same error text. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import difflib
import operator
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal

from livar_merge.errors import ConfigError

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def option(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with its help text and bounds (``ge=1``, ``gt=0, lt=1``, ...)."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"option() bounds are {sorted(_BOUNDS)}, got {sorted(unknown)}")
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_like(cls: type, name: str, default: Any) -> Any:
    """Option ``name`` of the dataclass ``cls`` (its help text and bounds) with another default:
    for a config composed of an option group whose defaults it does not share."""
    for f in fields(cls):
        if f.name == name:
            if isinstance(default, list | dict):
                return field(default_factory=lambda: type(default)(default), metadata=f.metadata)
            return field(default=default, metadata=f.metadata)
    raise TypeError(f"{cls.__name__} declares no option {name!r}")


@dataclass(frozen=True)
class OptionSpec:
    """One config field as an option: scalar ``kind``, list-ness, ``None``-ability, the
    ``Literal`` choices and the bounds, checked the same way whatever the value's source."""

    name: str
    kind: type
    is_list: bool
    nullable: bool
    choices: tuple[Any, ...] | None
    bounds: dict[str, float]
    help: str
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any) -> Any:
        """A file, command-line or run-config value converted to this option's type and
        checked. ``"none"``/``"null"`` give None where allowed; booleans accept true/false/
        1/0/yes/no; lists accept a list, one value or a ``"a,b"``/``"a b"`` string."""
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if not self.nullable:
                raise ConfigError(f"option {self.name} cannot be None")
            return None
        if self.is_list:
            if isinstance(value, str):  # TOML strings, Flower run-config values
                value = [item for item in value.replace(",", " ").split() if item]
            items = value if isinstance(value, list | tuple) else [value]
            value = [self._scalar(item) for item in items]
        else:
            value = self._scalar(value)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise :class:`ConfigError` unless ``value`` has this option's type, is one of its
        choices and lies within its bounds."""
        if value is None:
            if not self.nullable:
                raise ConfigError(f"option {self.name} cannot be None")
            return
        if self.is_list and not isinstance(value, list | tuple):
            raise ConfigError(f"option {self.name} expects a list, got {value!r}")
        items: list[Any] = list(value) if self.is_list else [value]
        for item in items:
            self._check_item(item, value)

    def _check_item(self, item: Any, value: Any) -> None:
        allowed = (int, float) if self.kind is float else (self.kind,)
        if not isinstance(item, allowed) or (self.kind is not bool and isinstance(item, bool)):
            raise ConfigError(f"option {self.name} expects {self.kind.__name__}, got {item!r}")
        if self.choices is not None and item not in self.choices:
            allowed_text = ", ".join(repr(c) for c in self.choices)
            raise ConfigError(f"option {self.name} must be one of {allowed_text}; got {item!r}")
        for bound, limit in self.bounds.items():
            if not _COMPARE[bound](item, limit):
                what = "hold values " if self.is_list else "be "
                raise ConfigError(
                    f"option {self.name} must {what}{self.bounds_text()}, got {value!r}"
                )

    def bounds_text(self) -> str:
        """``">= 1"``, ``"in (0, 1)"``, ...; empty without bounds."""
        low = next(((k, v) for k, v in self.bounds.items() if k in ("ge", "gt")), None)
        high = next(((k, v) for k, v in self.bounds.items() if k in ("le", "lt")), None)
        if low and high:
            left, right = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
            return f"in {left}{low[1]:g}, {high[1]:g}{right}"
        return " and ".join(f"{_BOUNDS[k]} {v:g}" for k, v in self.bounds.items())

    def _scalar(self, value: Any) -> Any:
        if self.kind is bool and isinstance(value, str):
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"option {self.name} expects true/false, got {value!r}")
            return value.lower() in _TRUE
        try:
            return self.kind(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"option {self.name} expects {self.kind.__name__}, got {value!r}"
            ) from err

    def argparse_type(self) -> Callable[[str], str]:
        """An argparse ``type`` that checks one command-line value as :meth:`coerce` does
        (same message) and keeps the text, so :func:`collect_overrides` sees what was typed."""

        def check(text: str) -> str:
            try:
                self.coerce([text] if self.is_list else text)
            except ConfigError as err:
                raise argparse.ArgumentTypeError(str(err)) from err
            return text

        check.__name__ = self.kind.__name__  # argparse names the type in its own messages
        return check


def _parse_type(hint: Any) -> tuple[type, bool, bool, tuple[Any, ...] | None]:
    """``(kind, is_list, nullable, choices)`` of an annotation such as ``int | None``,
    ``list[float]`` or ``Literal["a", "b"]``."""
    nullable = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        (hint,) = args
    is_list = typing.get_origin(hint) is list
    if is_list:
        (hint,) = typing.get_args(hint)
    choices = None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    return hint, is_list, nullable, choices


def _default(f: Field[Any]) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]


_SPECS: dict[type, dict[str, OptionSpec]] = {}


def option_specs(cls: type) -> dict[str, OptionSpec]:
    """The :class:`OptionSpec` of every field of the dataclass ``cls``, in field order."""
    if cls in _SPECS:
        return _SPECS[cls]
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in fields(cls):
        kind, is_list, nullable, choices = _parse_type(hints[f.name])
        specs[f.name] = OptionSpec(
            name=f.name,
            kind=kind,
            is_list=is_list,
            nullable=nullable,
            choices=choices,
            bounds=dict(f.metadata.get("bounds", {})),
            help=f.metadata.get("help", ""),
            default=_default(f),
        )
    _SPECS[cls] = specs
    return specs


def option_spec(cls: type, name: str) -> OptionSpec:
    """The spec of option ``name`` of ``cls``; :class:`ConfigError` (with the closest names)
    for an unknown one."""
    specs = option_specs(cls)
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown option {name!r}{hint}")
    return specs[name]


def coerce_option(cls: type, name: str, value: Any) -> Any:
    """Convert a file, command-line or run-config value to the type of field ``name`` of
    ``cls`` and check it (choices, bounds): :meth:`OptionSpec.coerce`."""
    return option_spec(cls, name).coerce(value)


def check_dataclass(config: Any) -> None:
    """Check every field of a config dataclass instance against its declaration."""
    for name, spec in option_specs(type(config)).items():
        spec.check(getattr(config, name))


def add_dataclass_options(group: Any, cls: type) -> None:
    """Add one option per field of the dataclass ``cls`` to an argparse group (default None,
    so :func:`collect_overrides` keeps only what was given); Literal fields get ``choices``."""
    for spec in option_specs(cls).values():
        bounds = f", {spec.bounds_text()}" if spec.bounds else ""
        text = f"{spec.help} (default: {spec.default}{bounds})"
        if spec.kind is bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(spec.flag, dest=spec.name, default=None, action=action, help=text)
            continue
        group.add_argument(
            spec.flag,
            dest=spec.name,
            default=None,
            nargs="+" if spec.is_list else None,
            type=spec.argparse_type(),
            choices=None if spec.choices is None else [str(c) for c in spec.choices],
            metavar=None if spec.choices is not None else spec.kind.__name__.upper(),
            help=text,
        )


def collect_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user actually gave (non-None) for fields of ``cls``."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if getattr(args, f.name, None) is not None
    }


def cli_parser(prog: str, description: str | None, examples: str) -> argparse.ArgumentParser:
    """The parser of a livar CLI: module docstring as description, examples as epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def report_error(prog: str, error: BaseException | str, note: str = "") -> int:
    """Print ``prog: error: <error><note>`` on stderr; the exit status 2 of a refused run."""
    print(f"{prog}: error: {error}{note}", file=sys.stderr)
    return 2
