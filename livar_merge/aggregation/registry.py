"""The aggregation-method registry: what each method is called, takes and needs (torch-free).

A :class:`MethodSpec` names a method's factory (``"module:attr"``, imported on first use, or a
callable), the options it declares (for the built-ins: the fields of the method's options
dataclass in :mod:`livar_merge.aggregation.options`, one declaration of their help, bounds and
defaults, which ``FedConfig`` is composed of), the client statistics it ``needs``,
whether it reads a G_SHAP table and whether it merges clients of different LoRA ranks
(``mixed_ranks``; :meth:`MethodSpec.check_client_ranks`). A run's method, options, table and
paired methods are so checked before torch, data or a model is loaded, and
:func:`make_aggregator` refuses an option its method does not declare instead of dropping it.

User methods register with the decorator::

    @register_method("trimmed", options=("lora_merge",), needs={"sigma"})
    def trimmed(*, lora_merge="product"):
        return MyAggregator(lora_merge)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from livar_merge.aggregation.needs import check_needs
from livar_merge.aggregation.options import (
    CCVROptions,
    FedProtoOptions,
    FisherOptions,
    RegMeanOptions,
    option_names,
)
from livar_merge.errors import MethodOptionError, RegistrationError, UnknownMethodError

if TYPE_CHECKING:
    from livar_merge.aggregation.types import Aggregator

Factory = Callable[..., "Aggregator"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``factory(**options) -> Aggregator``, the option names it takes,
    the statistics it needs from clients, whether it reads a G_SHAP table (``table``) and
    whether it can merge clients whose LoRA ranks differ on a layer (``mixed_ranks``: with its
    ``lora_merge`` option ``product`` or ``svd``; ``factors`` never can)."""

    name: str
    factory: str | Factory
    options: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    uses_table: bool = False
    description: str = ""
    mixed_ranks: bool = False

    def __post_init__(self) -> None:
        needs = check_needs(self.needs, f"method {self.name!r}")
        if self.uses_table and "table" not in self.options:
            raise RegistrationError(f"method {self.name!r} uses a table but takes no 'table'")
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "needs", needs)

    def load(self) -> Factory:
        """The factory (a ``"module:attr"`` reference is imported now)."""
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)

    def check_options(self, options: Iterable[str]) -> None:
        """Raise :class:`MethodOptionError` naming any option this method does not declare."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise MethodOptionError(
                f"aggregation method {self.name!r} does not take option(s) "
                f"{', '.join(unknown)}; it takes: {', '.join(self.options) or 'no options'}"
            )

    def check_client_ranks(
        self, ranks: Iterable[int], *, lora_merge: str | None = None, rank: int | None = None
    ) -> None:
        """Before training: :class:`MethodOptionError` when the clients' LoRA ``ranks`` differ
        and this method cannot merge them: ``mixed_ranks`` is False, or its ``lora_merge``
        option is ``factors``, or ``svd`` without the server's ``rank`` (the target).
        ``lora_merge`` is ignored for methods that take no such option."""
        distinct = sorted(set(ranks))
        if len(distinct) <= 1:
            return
        where = f"aggregation method {self.name!r}"
        if not self.mixed_ranks:
            raise MethodOptionError(
                f"{where} needs one LoRA rank for all clients; got ranks {distinct}"
            )
        merge = lora_merge if "lora_merge" in self.options else None
        if merge == "factors":
            raise MethodOptionError(
                f"{where} with lora_merge 'factors' needs one LoRA rank for all clients; got "
                f"ranks {distinct} (use lora_merge 'product' or 'svd')"
            )
        if merge == "svd" and rank is None:
            raise MethodOptionError(
                f"{where} with lora_merge 'svd' and client ranks {distinct} needs the target "
                "rank (the server's LoRA rank)"
            )

    def select(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The options of ``values`` (a run's options, or more) that this method declares."""
        return {name: values[name] for name in self.options if name in values}


_REGISTRY: dict[str, MethodSpec] = {}


def _add(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise RegistrationError(f"aggregation method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def keyword_parameters(factory: Callable[..., Any]) -> dict[str, Any]:
    """``{name: default}`` of the keyword parameters of ``factory`` (no ``**kwargs``)."""
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def register_method(
    name: str,
    *,
    options: Iterable[str] | None = None,
    needs: Iterable[str] = (),
    uses_table: bool | None = None,
    description: str = "",
    mixed_ranks: bool = False,
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(**options) -> Aggregator`` under ``name``.

    ``options`` defaults to the factory's keyword parameters and must be among them;
    ``uses_table`` defaults to whether ``"table"`` is one of them; ``mixed_ranks`` (default
    False) declares that the method merges clients of different LoRA ranks. To take part in
    ``livar-fed`` runs, options must be ``FedConfig`` fields (checked when a run is configured).
    """

    def decorator(factory: Factory) -> Factory:
        accepted = keyword_parameters(factory)
        takes_any = any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()
        )
        declared = tuple(accepted) if options is None else tuple(options)
        missing = [o for o in declared if o not in accepted]
        if missing and not takes_any:
            raise RegistrationError(
                f"method {name!r} declares option(s) {missing} that its factory does not take"
            )
        doc = (inspect.getdoc(factory) or "").split("\n")[0]
        table = "table" in declared if uses_table is None else uses_table
        _add(
            MethodSpec(
                name, factory, declared, frozenset(needs), table, description or doc, mixed_ranks
            )
        )
        return factory

    return decorator


def unregister_method(name: str) -> None:
    """Remove a registered method (tests, plugins re-registering)."""
    method_spec(name)
    del _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; :class:`UnknownMethodError` listing the available ones."""
    if name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown aggregation method {name!r}; available: {available_methods()}"
        )
    return _REGISTRY[name]


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build method ``name`` with ``options``, which must be options it declares (those not
    given keep their defaults, ``FedConfig``'s); :class:`MethodOptionError` otherwise."""
    spec = method_spec(name)
    spec.check_options(options)
    return spec.load()(**options)


# ----------------------------------------------------------------------------- built-ins
CCVR_OPTIONS = option_names(CCVROptions)
# name: (factory in livar_merge.aggregation.<module>:<attr>, options, needs); the methods'
# own options are the fields of their dataclass in livar_merge.aggregation.options
BUILTIN_METHODS = {
    "fedavg": ("weighted:fedavg", "table lora_merge", ""),
    "livar": ("weighted:livar", "table lora_merge", "omega sigma"),
    "livar-alpha": ("weighted:livar_alpha", "table lora_merge", "omega"),
    "livar-sigma": ("weighted:livar_sigma", "table lora_merge", "sigma"),
    "regmean": (
        "regmean:RegMeanAggregator",
        f"lora_merge {option_names(RegMeanOptions)}",
        "gram",
    ),
    "fisher": ("fisher:FisherAggregator", option_names(FisherOptions), "fisher"),
    "fedproto": (
        "fedproto:FedProtoAggregator",
        f"lora_merge {option_names(FedProtoOptions)}",
        "prototypes",
    ),
    "ccvr": ("ccvr:ccvr", f"lora_merge {CCVR_OPTIONS}", "moments"),
    "livar+ccvr": ("ccvr:livar_ccvr", f"table lora_merge {CCVR_OPTIONS}", "omega sigma moments"),
}
DESCRIPTIONS = {
    "fedavg": "LoRA and head weighted by sample counts",
    "livar": "LoRA by G_SHAP alpha (Eq. 5), head by class feature variance (Eq. 6)",
    "livar-alpha": "LoRA by G_SHAP alpha, head by sample counts (ablation)",
    "livar-sigma": "LoRA by sample counts, head by class feature variance (ablation)",
    "regmean": "RegMean: closed-form merge from the clients' input Grams",
    "fisher": "Fisher-weighted averaging of LoRA factors and head",
    "fedproto": "FedAvg plus global class prototypes for the clients' loss",
    "ccvr": "FedAvg, then CCVR's head calibration on virtual features",
    "livar+ccvr": "LIVAR, then CCVR's head calibration on virtual features",
}
# Built-ins that merge LoRA factors elementwise, so need one rank for all clients; the others
# merge products (Eq. 3, RegMean's dense deltas) and take mixed ranks with lora_merge
# 'product' or 'svd'.
SINGLE_RANK_METHODS = frozenset({"fisher"})

for _name, (_factory, _options, _needs) in BUILTIN_METHODS.items():
    _add(
        MethodSpec(
            _name,
            f"livar_merge.aggregation.{_factory}",
            tuple(_options.split()),
            frozenset(_needs.split()),
            uses_table="omega" in _needs.split(),  # G_SHAP alpha is a function of the omegas
            description=DESCRIPTIONS[_name],
            mixed_ranks=_name not in SINGLE_RANK_METHODS,
        )
    )
