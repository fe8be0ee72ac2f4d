"""The client statistics a method may need: the one vocabulary of their names, where a
:class:`~livar_merge.aggregation.types.ClientUpdate` carries them, their Flower wire names and
shapes, and whether they are *passive* (collected without changing local training, under the
run's own model, so a paired method may use them on the run's updates).

=============  =====================================  ==========================================
need           in a ClientUpdate                       on the Flower wire (reply ``arrays``)
=============  =====================================  ==========================================
omega          ``omega_a``, ``omega_b`` ``[L]``        metrics ``omega-a``, ``omega-b``
sigma          ``class_sigma/_present/_counts`` [C]    metrics ``class-sigma``, ...
gram           extras ``gram`` {layer: [k, k]},       ``gram/<layer>``, ``head-gram``
               ``head_gram`` ``[D+1, D+1]``
fisher         extras ``fisher`` {key: shape of the   ``fisher/<key>``
               parameter}
prototypes     extras ``proto_mean`` ``[C, D]`` (NaN  ``proto-mean``, ``proto-count``
               rows for unseen classes),
               ``proto_count`` ``[C]``
moments        (a query after aggregation, not in     a ``moments`` query reply
               the update)
=============  =====================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from livar_merge.errors import RegistrationError


@dataclass(frozen=True)
class StatisticField:
    """One entry of ``ClientUpdate.extras`` and its Flower wire name.

    ``keyed``: a mapping of tensors (per layer or parameter) sent as ``<wire>/<key>``;
    ``non_negative``: negative values are refused on the wire; ``nan_rows_where_zero``: the
    wire name of a count field: rows may be NaN where that count is 0 (FedProto's prototypes
    of classes a client never saw); ``numpy``: unpacked from the wire as a NumPy array (else a
    tensor).
    """

    extra: str
    wire: str
    shape: str
    keyed: bool = False
    non_negative: bool = False
    nan_rows_where_zero: str | None = None
    numpy: bool = False

    @property
    def nan_rows(self) -> bool:
        return self.nan_rows_where_zero is not None


@dataclass(frozen=True)
class Need:
    """A client statistic a method may declare in its ``needs``."""

    name: str
    description: str
    passive: bool
    fields: tuple[StatisticField, ...] = ()


OMEGA = Need("omega", "running sums of gradient x update per LoRA matrix (Eq. 4)", passive=True)
SIGMA = Need("sigma", "per-class feature variance and counts (Eq. 6)", passive=True)
GRAM = Need(
    "gram",
    "input Gram matrices of every LoRA Linear and of the head (RegMean)",
    passive=True,
    fields=(
        StatisticField("gram", "gram", "{layer: [k, k]}", keyed=True),
        StatisticField("head_gram", "head-gram", "[D+1, D+1]"),
    ),
)
FISHER = Need(
    "fisher",
    "diagonal empirical Fisher of the trainable parameters (Fisher averaging)",
    passive=True,
    fields=(
        StatisticField("fisher", "fisher", "{parameter: its shape}", keyed=True, non_negative=True),
    ),
)
PROTOTYPES = Need(
    "prototypes",
    "class-mean features and counts; FedProto's loss term changes local training",
    passive=False,
    fields=(
        StatisticField(
            "proto_mean", "proto-mean", "[C, D]", nan_rows_where_zero="proto-count", numpy=True
        ),
        StatisticField("proto_count", "proto-count", "[C]", non_negative=True, numpy=True),
    ),
)
MOMENTS = Need(
    "moments",
    "class feature moments under the new global model, queried after aggregation (CCVR)",
    passive=False,
)

NEEDS: dict[str, Need] = {n.name: n for n in (OMEGA, SIGMA, GRAM, FISHER, PROTOTYPES, MOMENTS)}
PASSIVE_NEEDS = frozenset(name for name, need in NEEDS.items() if need.passive)
# every field carried in ClientUpdate.extras, by its extras key
EXTRA_FIELDS: dict[str, StatisticField] = {
    f.extra: f for need in NEEDS.values() for f in need.fields
}
WIRE_FIELDS: dict[str, StatisticField] = {f.wire: f for f in EXTRA_FIELDS.values()}


def check_needs(needs: Iterable[str], who: str) -> frozenset[str]:
    """``needs`` as a frozenset, refusing names outside the vocabulary (naming ``who``)."""
    given = frozenset(needs)
    unknown = sorted(given - NEEDS.keys())
    if unknown:
        raise RegistrationError(f"{who} needs {unknown}; known needs: {sorted(NEEDS)}")
    return given


def wire_field(key: str) -> StatisticField | None:
    """The statistic field of a reply array ``key`` (``gram/<layer>`` -> the Gram field),
    None for an array that is no statistic (LoRA factors, head)."""
    name, sep, _ = key.partition("/")
    field = WIRE_FIELDS.get(name)
    if field is None or field.keyed != bool(sep):
        return None
    return field
