"""The options each built-in method declares, once (torch-free, like the registry).

One dataclass per method: the ``option()`` fields give the help text, bounds, choices and the
default. ``FedConfig`` is composed of them (so ``--regmean-shrinkage``, config files and Flower
run configs come from here), the registry's :class:`~livar_merge.aggregation.registry.MethodSpec`
lists their names, and the methods' factories take their defaults from them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from livar_merge._options import option


@dataclass
class RegMeanOptions:
    regmean_shrinkage: float = option(
        0.5, "RegMean: scale of the Gram off-diagonals (1: none)", ge=0, le=1
    )


@dataclass
class FisherOptions:
    fisher_floor: float = option(1e-8, "Fisher averaging: floor added to every Fisher entry", ge=0)


@dataclass
class FedProtoOptions:
    proto_weight: float = option(1.0, "FedProto: weight lambda of the prototype term", ge=0)


@dataclass
class CCVROptions:
    ccvr_samples: int = option(256, "CCVR: virtual features sampled per class", ge=1)
    ccvr_epochs: int = option(5, "CCVR: epochs of head re-training", ge=1)
    ccvr_lr: float = option(0.01, "CCVR: SGD learning rate (momentum 0.9, cosine schedule)", gt=0)
    ccvr_temperature: float = option(0.1, "CCVR: temperature of the logit-normalised loss", gt=0)
    ccvr_covariance: Literal["full", "diag"] = option("full", "CCVR: class covariances")
    ccvr_rounds: Literal["all", "last"] = option(
        "all",
        "CCVR: calibrate the head after 'all' rounds (the next round starts from it) or only "
        "after the 'last' (post-hoc, as the CCVR paper)",
    )


def option_names(options: type) -> str:
    """The field names of a method's options dataclass, space-separated (registry form)."""
    return " ".join(f.name for f in fields(options))
