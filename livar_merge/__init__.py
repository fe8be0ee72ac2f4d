"""livar_merge: LIVAR aggregation of LoRA ViTs in federated learning.

Server side: :func:`livar_coefficients` (Eq. 5) from a :class:`GShapTable`, :func:`merge_lora`
(Eq. 3) and :func:`merge_heads` (Eq. 6). Client side: :class:`ImportanceTracker` (omega_A,
omega_B) and :class:`ClassFeatureStats` (sigma^(c)).
"""

from livar_merge.coefficients import (
    CoefficientDetails,
    livar_coefficient_details,
    livar_coefficients,
)
from livar_merge.errors import ClientUpdateError, LivarError, TableError
from livar_merge.fedavg import fedavg_head, fedavg_lora, fedavg_weights
from livar_merge.heads import MergedHead, merge_heads, sample_class_weights, variance_class_weights
from livar_merge.lora import (
    LoraDelta,
    lora_layer_names,
    merge_lora,
    peft_scalings,
    to_peft_state_dict,
)
from livar_merge.signals import (
    ClassFeatureStats,
    ClassStatistics,
    ImportanceTracker,
    LayerImportance,
    find_lora_parameters,
)
from livar_merge.tables import GShapTable, available_tables, make_table

__version__ = "0.1.0"

__all__ = [
    "ClassFeatureStats",
    "ClassStatistics",
    "ClientUpdateError",
    "CoefficientDetails",
    "GShapTable",
    "ImportanceTracker",
    "LayerImportance",
    "LivarError",
    "LoraDelta",
    "MergedHead",
    "TableError",
    "__version__",
    "available_tables",
    "fedavg_head",
    "fedavg_lora",
    "fedavg_weights",
    "find_lora_parameters",
    "livar_coefficient_details",
    "livar_coefficients",
    "lora_layer_names",
    "make_table",
    "merge_heads",
    "merge_lora",
    "peft_scalings",
    "sample_class_weights",
    "to_peft_state_dict",
    "variance_class_weights",
]
