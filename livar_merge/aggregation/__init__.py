"""Server-side aggregation methods behind one registry (used by ``livar-fed`` and Flower).

A method turns the clients' :class:`ClientUpdate` objects into a merged LoRA and head. One
module per method family, its math beside it:

============== ===================================================================
``needs``      the vocabulary of client statistics (Need, NEEDS; no torch)
``types``      ClientUpdate, MergeContext, AggregationResult, Aggregator, validate_updates
``registry``   MethodSpec, register_method, method_spec, make_aggregator (no torch)
``common``     helpers of the method modules (head biases, a merge without weights)
``weighted``   fedavg, livar, livar-alpha, livar-sigma (the paper's Table 4)
``regmean``    regmean: closed-form merge from input Grams
``fisher``     fisher: Fisher-weighted averaging
``fedproto``   fedproto: FedAvg plus global class prototypes
``ccvr``       ccvr, livar+ccvr: head calibration on virtual features
============== ===================================================================

Importing this package (or its registry) does not import torch; the other names load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from livar_merge._lazy import lazy_attributes as _lazy_attributes
from livar_merge.aggregation.needs import NEEDS, Need
from livar_merge.aggregation.registry import (
    MethodSpec,
    available_methods,
    make_aggregator,
    method_spec,
    register_method,
    unregister_method,
)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from livar_merge.aggregation.ccvr import CCVRAggregator, ClassMoments
    from livar_merge.aggregation.fedproto import FedProtoAggregator
    from livar_merge.aggregation.fisher import FisherAggregator
    from livar_merge.aggregation.regmean import RegMeanAggregator
    from livar_merge.aggregation.types import (
        AggregationResult,
        Aggregator,
        ClientUpdate,
        MergeContext,
        payload_nbytes,
        validate_updates,
    )
    from livar_merge.aggregation.weighted import WeightedAggregator

_LAZY = {
    "AggregationResult": "livar_merge.aggregation.types",
    "Aggregator": "livar_merge.aggregation.types",
    "CCVRAggregator": "livar_merge.aggregation.ccvr",
    "ClassMoments": "livar_merge.aggregation.ccvr",
    "ClientUpdate": "livar_merge.aggregation.types",
    "FedProtoAggregator": "livar_merge.aggregation.fedproto",
    "FisherAggregator": "livar_merge.aggregation.fisher",
    "MergeContext": "livar_merge.aggregation.types",
    "RegMeanAggregator": "livar_merge.aggregation.regmean",
    "WeightedAggregator": "livar_merge.aggregation.weighted",
    "payload_nbytes": "livar_merge.aggregation.types",
    "validate_updates": "livar_merge.aggregation.types",
}


# PEP 562: torch loads with the first of these names
__getattr__, __dir__ = _lazy_attributes(__name__, globals(), _LAZY)


# literal, for static tools; test_options checks it equals the lazy table plus the registry
__all__ = [
    "NEEDS",
    "AggregationResult",
    "Aggregator",
    "CCVRAggregator",
    "ClassMoments",
    "ClientUpdate",
    "FedProtoAggregator",
    "FisherAggregator",
    "MergeContext",
    "MethodSpec",
    "Need",
    "RegMeanAggregator",
    "WeightedAggregator",
    "available_methods",
    "make_aggregator",
    "method_spec",
    "payload_nbytes",
    "register_method",
    "unregister_method",
    "validate_updates",
]
