"""livar_merge: LIVAR aggregation of LoRA ViTs in federated learning.

Server side: :func:`livar_coefficients` (Eq. 5) from a :class:`GShapTable`, :func:`merge_lora`
(Eq. 3) and :func:`merge_heads` (Eq. 6). Client side: :class:`ImportanceTracker` (omega_A,
omega_B) and :class:`ClassFeatureStats` (sigma^(c)).
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING

from livar_merge._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from livar_merge.aggregation import (
        AggregationResult,
        Aggregator,
        ClientUpdate,
        available_methods,
        make_aggregator,
        register_method,
    )
    from livar_merge.coefficients import (
        CoefficientDetails,
        livar_coefficient_details,
        livar_coefficients,
    )
    from livar_merge.errors import ClientUpdateError, LivarError, TableError, WeightsError
    from livar_merge.fedavg import fedavg_head, fedavg_lora, fedavg_weights
    from livar_merge.heads import (
        MergedHead,
        merge_heads,
        sample_class_weights,
        variance_class_weights,
    )
    from livar_merge.lora import LoraDelta, lora_layer_names, merge_lora, to_peft_state_dict
    from livar_merge.lora_view import find_lora_parameters, peft_scalings
    from livar_merge.signals import (
        ClassFeatureStats,
        ClassStatistics,
        ImportanceTracker,
        LayerImportance,
    )
    from livar_merge.tables import GShapTable, available_tables, make_table

# name -> module: the one list of the public API (``__all__`` and ``dir()`` come from it)
_LAZY = {
    "AggregationResult": "livar_merge.aggregation",
    "Aggregator": "livar_merge.aggregation",
    "ClientUpdate": "livar_merge.aggregation",
    "available_methods": "livar_merge.aggregation",
    "make_aggregator": "livar_merge.aggregation",
    "register_method": "livar_merge.aggregation",
    "WeightsError": "livar_merge.errors",
    "ClassFeatureStats": "livar_merge.signals",
    "ClassStatistics": "livar_merge.signals",
    "ClientUpdateError": "livar_merge.errors",
    "CoefficientDetails": "livar_merge.coefficients",
    "GShapTable": "livar_merge.tables",
    "ImportanceTracker": "livar_merge.signals",
    "LayerImportance": "livar_merge.signals",
    "LivarError": "livar_merge.errors",
    "LoraDelta": "livar_merge.lora",
    "MergedHead": "livar_merge.heads",
    "TableError": "livar_merge.errors",
    "available_tables": "livar_merge.tables",
    "fedavg_head": "livar_merge.fedavg",
    "fedavg_lora": "livar_merge.fedavg",
    "fedavg_weights": "livar_merge.fedavg",
    "find_lora_parameters": "livar_merge.lora_view",
    "livar_coefficient_details": "livar_merge.coefficients",
    "livar_coefficients": "livar_merge.coefficients",
    "lora_layer_names": "livar_merge.lora",
    "make_table": "livar_merge.tables",
    "merge_heads": "livar_merge.heads",
    "merge_lora": "livar_merge.lora",
    "peft_scalings": "livar_merge.lora_view",
    "sample_class_weights": "livar_merge.heads",
    "to_peft_state_dict": "livar_merge.lora",
    "variance_class_weights": "livar_merge.heads",
}


# PEP 562: keep `import livar_merge` light (CLIs start instantly)
__getattr__, __dir__ = _lazy_attributes(__name__, globals(), _LAZY)


try:
    __version__ = _metadata.version("livar")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = sorted([*_LAZY, "__version__"])
