"""livar_merge: LIVAR aggregation of LoRA ViTs in federated learning.

Server side: :func:`livar_coefficients` (Eq. 5) from a :class:`GShapTable`, :func:`merge_lora`
(Eq. 3) and :func:`merge_heads` (Eq. 6). Client side: :class:`ImportanceTracker` (omega_A,
omega_B) and :class:`ClassFeatureStats` (sigma^(c)).
"""

_LAZY = {
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
    "find_lora_parameters": "livar_merge.signals",
    "livar_coefficient_details": "livar_merge.coefficients",
    "livar_coefficients": "livar_merge.coefficients",
    "lora_layer_names": "livar_merge.lora",
    "make_table": "livar_merge.tables",
    "merge_heads": "livar_merge.heads",
    "merge_lora": "livar_merge.lora",
    "peft_scalings": "livar_merge.lora",
    "sample_class_weights": "livar_merge.heads",
    "to_peft_state_dict": "livar_merge.lora",
    "variance_class_weights": "livar_merge.heads",
}


def __getattr__(name: str):  # PEP 562: keep `import livar_merge` light (CLIs start instantly)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'livar_merge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


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
