"""Configuration of a calibration run (``livar-calibrate``). Imports nothing heavy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from livar_merge._options import check_dataclass, option, option_like
from livar_merge.errors import ConfigError
from livar_merge.federated.config import (
    DataOptions,
    LoraMerge,
    ModelOptions,
    PartitionOptions,
    RuntimeOptions,
    TrainingOptions,
    check_dataset_name,
)
from livar_merge.federated.migrations import (
    legacy_calibration_hash_body,
    legacy_training_hash_body,
)
from livar_merge.federated.partition import check_partitioner
from livar_merge.tracking.base import check_trackers

DISCRETISE_HELP = (
    "how SHAP values become table cells: 'cell-mean' (mean forest prediction per cell), "
    "'interaction' (main effects + SHAP interaction values per cell) or 'additive' (base + "
    "mean SHAP of the A bin + of the B bin: cannot hold Table A's shape)"
)


@dataclass
class CalibConfig(RuntimeOptions, TrainingOptions, PartitionOptions, DataOptions, ModelOptions):
    """Every option of ``livar-calibrate``. Defaults: the embedded default proxy, sized for a slow
    2-core laptop: Fashion-MNIST at 42 px on the offline pretrained DINOv2 ViT-S/14
    (``dinov2-s14-imgfocus``: a saliency fine-tune of DINOv2, not the paper's in21k ViT-B/16),
    5 clients, 500 images, 12 (beta, seed) runs of 1 round and 1 local epoch (12,000 image
    passes; ``--preset standard`` is the earlier default, 48,000). ``--preset paper`` is the
    paper's set-up (Tiny-ImageNet, ViT-B/16 in21k, 5 clients); ``--preset random-init`` the
    earlier digits / random-init control."""

    # the shared option groups at the calibration's defaults (help and bounds: the groups')
    image_size: int = option_like(DataOptions, "image_size", 42)
    max_train: int | None = option_like(DataOptions, "max_train", 500)
    max_test: int | None = option_like(DataOptions, "max_test", 500)
    model: str = option_like(ModelOptions, "model", "vit_small_patch14_dinov2")
    weights: str = option_like(ModelOptions, "weights", "dinov2-s14-imgfocus")
    lora_rank: int = option_like(ModelOptions, "lora_rank", 8)
    lora_alpha: float = option_like(ModelOptions, "lora_alpha", 8.0)
    lr: float = option_like(TrainingOptions, "lr", 1e-3)
    local_epochs: int = option_like(TrainingOptions, "local_epochs", 1)
    threads: int | None = option_like(RuntimeOptions, "threads", 2)

    # proxy data and federation
    proxy: str = option(
        "fashion-mnist", "proxy dataset of the runtime's registry (paper: tiny-imagenet)"
    )
    num_clients: int = option(5, "federated clients per repeat (paper: 5)", ge=1)
    min_client_samples: int = option(10, "minimum samples per client of the Dirichlet split")
    betas: list[float] = option(
        [0.1, 0.3, 1.0], "Dirichlet concentrations; each is a repeat set", gt=0
    )
    seeds: list[int] = option([0, 1, 2, 3], "seeds; each (beta, seed) is one proxy run")
    rounds: int = option(1, "rounds per proxy run; each round is one repeat", ge=1)
    next_start: Literal["joint", "fedavg"] = option(
        "joint",
        "how the next round starts: 'joint' (the joint model's state) or 'fedavg' (the "
        "sample-weighted merge of the clients)",
    )
    # model and training (as livar-fed)
    # analysis
    sample_feature: bool = option(
        True, "also fit a forest with the sample count (paper's Figure A)"
    )
    n_estimators: int = option(200, "trees of the random forest", ge=1)
    min_samples_leaf: int = option(20, "minimum rows per leaf (keeps exact SHAP fast)", ge=1)
    holdout_fraction: float = option(
        0.25, "fraction of repeats held out for error figures", gt=0, lt=1
    )
    edges: Literal["paper", "shap-curve"] = option(
        "paper", "'paper' (A: 25, 50; B: 60, 80) or 'shap-curve'"
    )
    discretise: Literal["cell-mean", "interaction", "additive"] = option(
        "cell-mean", DISCRETISE_HELP
    )
    min_cell_rows: int = option(
        50,
        "cells with fewer rows are shrunk towards the additive value: weight n/min_cell_rows on "
        "the rule's cell value (0 rows: the additive value; 0: no shrinkage)",
        ge=0,
    )
    cell_resamples: int = option(
        200, "bootstrap resamples of training runs for the per-cell intervals (0: none)", ge=0
    )
    downstream: bool = option(
        True,
        "score the merged model of each scheme (tables, FedAvg, oracle) on the proxy test set "
        "for every held-out repeat, on the same client updates",
    )
    table_name: str | None = option(None, "table name (default <proxy>-<model>)")
    seed: int = option(0, "seed of the forest and the hold-out split")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        skip = ("progress", "threads", "track")
        body = legacy_calibration_hash_body(
            {k: v for k, v in self.to_dict().items() if k not in skip}
        )
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def training_hash(self) -> str:
        """SHA-256 of the options the proxy training depends on (:func:`training_hash`)."""
        return training_hash(self.to_dict())

    # what the federation builder reads beyond the declared options: the proxy training uses
    # no LoRA dropout and no data-loader workers, and folds each round's delta into the frozen
    # weights (:meth:`livar_calib.proxy.ProxyTrainer.run_round`), as lora_merge "product"
    lora_dropout: ClassVar[float] = 0.0
    num_workers: ClassVar[int] = 0
    lora_merge: ClassVar[LoraMerge] = "product"

    def default_table_name(self) -> str:
        name = f"{self.proxy}-{self.model}".lower()
        return re.sub(r"[^a-z0-9_.+-]", "-", name).strip("-.")


# options of the analysis stages (forest, SHAP, discretisation, quality): a resumed calibration
# may change them and re-runs only the analysis on the saved proxy training
ANALYSIS_OPTIONS = frozenset(
    {
        "sample_feature",
        "n_estimators",
        "min_samples_leaf",
        "holdout_fraction",
        "edges",
        "discretise",
        "min_cell_rows",
        "cell_resamples",
        "max_test",
        "downstream",
        "table_name",
        "seed",
    }
)


def training_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a calibration config's training options (not analysis, progress, threads)."""
    skip = ANALYSIS_OPTIONS | {"progress", "threads", "track"}
    body = legacy_training_hash_body({k: v for k, v in config.items() if k not in skip})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


CALIB_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The embedded default until December 2026: 4x the training of today's default (6 runs of
    # 2 rounds, 1,000 images, 2 local epochs), whose rounds were then the resampling unit.
    "standard": {
        "max_train": 1000,
        "max_test": None,
        "betas": [0.1, 0.3, 1.0],
        "seeds": [0, 1],
        "rounds": 2,
        "local_epochs": 2,
    },
    # The paper's calibration: Tiny-ImageNet, ViT-B/16 in21k, 5 clients (Section 4.1).
    "paper": {
        "proxy": "tiny-imagenet",
        "image_size": 224,
        "max_train": None,
        "model": "vit_base_patch16_224.augreg_in21k",
        "weights": "auto",
        "patch_size": None,
        "embed_dim": None,
        "depth": None,
        "num_heads": None,
        "lora_rank": 16,
        "lora_alpha": 16.0,
        "lr": 1e-4,
        "batch_size": 16,
        "local_epochs": 5,
        "rounds": 5,
        "betas": [0.05, 0.1, 0.5, 1.0],
        "seeds": [0, 1, 2],
        "threads": None,
    },
    # The earlier embedded default, kept as a control: digits at 16 px on a random-init 4-block
    # width-64 ViT (its table says nothing about LIVAR: no pretrained backbone).
    "random-init": {
        "proxy": "digits",
        "image_size": 16,
        "max_train": None,
        "model": "vit_tiny_patch16_224",
        "weights": "random",
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 2,
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "lr": 3e-3,
        "batch_size": 32,
        "rounds": 4,
        "local_epochs": 2,
    },
    # For tests: seconds.
    "tiny": {
        "proxy": "synthetic",
        "image_size": 16,
        "max_train": 300,
        "model": "vit_tiny_patch16_224",
        "weights": "random",
        "num_heads": 2,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "lora_rank": 2,
        "lora_alpha": 4.0,
        "num_clients": 3,
        "betas": [0.5],
        "seeds": [0, 1],
        "rounds": 1,
        "local_epochs": 1,
        "n_estimators": 20,
        "min_samples_leaf": 2,
        "progress": False,
    },
}


def validate_calib_config(config: CalibConfig) -> None:
    """Raise :class:`ConfigError` naming the option at fault: every value against its
    declaration (type, choices, bounds), then the checks across options. Cheap (imports
    nothing heavy), so ``livar-calibrate`` runs it before anything is loaded or written."""
    check_dataclass(config)
    check_dataset_name(config.proxy, "proxy")
    check_trackers(config.track)
    check_partitioner(config.partitioner)
    if config.max_train is not None and config.max_train < config.num_clients:
        raise ConfigError(
            f"option max_train ({config.max_train}) is below num_clients ({config.num_clients})"
        )
    if not config.betas:
        raise ConfigError("option betas must hold one or more values")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"option seeds must be one or more distinct seeds, got {config.seeds}")
