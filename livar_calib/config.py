"""Configuration of a calibration run (``livar-calibrate``). Imports nothing heavy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class CalibConfig:
    """Every option of ``livar-calibrate``. Defaults: the embedded default proxy, which runs on
    2 CPU cores in minutes: Fashion-MNIST at 42 px on the offline pretrained DINOv2 ViT-S/14
    (``dinov2-s14-imgfocus``: a saliency fine-tune of DINOv2, not the paper's in21k ViT-B/16),
    5 clients, 1,000 images. ``--preset paper`` is the paper's set-up (Tiny-ImageNet, ViT-B/16
    in21k, 5 clients); ``--preset random-init`` the earlier digits / random-init control."""

    # proxy data and federation
    proxy: str = _opt(
        "fashion-mnist", "proxy dataset of the runtime's registry (paper: tiny-imagenet)"
    )
    data_root: str | None = _opt(None, "folder holding the proxy dataset")
    image_size: int = _opt(42, "input resolution")
    max_train: int | None = _opt(1000, "stratified subsample of the proxy training set")
    num_clients: int = _opt(5, "federated clients per repeat (paper: 5)")
    min_client_samples: int = _opt(10, "minimum samples per client of the Dirichlet split")
    betas: list[float] = _opt([0.1, 0.3, 1.0], "Dirichlet concentrations; each is a repeat set")
    seeds: list[int] = _opt([0, 1], "seeds; each (beta, seed) is one proxy run")
    rounds: int = _opt(2, "rounds per proxy run; each round is one repeat")
    next_start: str = _opt(
        "joint",
        "how the next round starts: 'joint' (the joint model's state) or 'fedavg' (the "
        "sample-weighted merge of the clients)",
    )
    # model and training (as livar-fed)
    model: str = _opt("vit_small_patch14_dinov2", "timm model name")
    weights: str = _opt(
        "dinov2-s14-imgfocus",
        "'random', 'auto', 'hf-cache', 'dinov2-s14-imgfocus' (needs --model "
        "vit_small_patch14_dinov2) or a weights file",
    )
    patch_size: int | None = _opt(None, "patch size override (random init only)")
    embed_dim: int | None = _opt(None, "width override (random init only)")
    depth: int | None = _opt(None, "blocks override (random init only)")
    num_heads: int | None = _opt(None, "heads override (random init only)")
    lora_rank: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(8.0, "LoRA alpha")
    lr: float = _opt(1e-3, "AdamW learning rate")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    batch_size: int = _opt(16, "batch size")
    local_epochs: int = _opt(2, "local epochs per round, for clients and the joint model alike")
    omega_reduction: str = _opt("matrix", "omega per step: 'matrix' or 'elementwise'")
    precision: str = _opt("auto", "'auto', 'fp32', 'bf16'")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda'")
    threads: int | None = _opt(2, "torch CPU threads")
    # analysis
    sample_feature: bool = _opt(True, "also fit a forest with the sample count (paper's Figure A)")
    n_estimators: int = _opt(200, "trees of the random forest")
    min_samples_leaf: int = _opt(20, "minimum rows per leaf (keeps exact SHAP fast)")
    holdout_fraction: float = _opt(0.25, "fraction of repeats held out for error figures")
    edges: str = _opt("paper", "'paper' (A: 25, 50; B: 60, 80) or 'shap-curve'")
    table_name: str | None = _opt(None, "table name (default <proxy>-<model>)")
    seed: int = _opt(0, "seed of the forest and the hold-out split")
    progress: bool = _opt(True, "progress bars")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        body = {k: v for k, v in self.to_dict().items() if k not in ("progress", "threads")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def default_table_name(self) -> str:
        import re

        name = f"{self.proxy}-{self.model}".lower()
        return re.sub(r"[^a-z0-9_.+-]", "-", name).strip("-.")


CALIB_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
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
        "seeds": [0],
        "rounds": 2,
        "local_epochs": 1,
        "n_estimators": 20,
        "min_samples_leaf": 2,
        "progress": False,
    },
}


def validate_calib_config(config: CalibConfig) -> None:
    """Raise ``ValueError`` naming the option at fault; cheap (imports nothing heavy), so it runs
    before anything is written."""
    choices = {
        "next_start": ("joint", "fedavg"),
        "edges": ("paper", "shap-curve"),
        "omega_reduction": ("matrix", "elementwise"),
        "precision": ("auto", "fp32", "bf16", "fp16"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"--{name.replace('_', '-')} must be one of {allowed}, got "
                f"{getattr(config, name)!r}"
            )
    for name in (
        "image_size",
        "num_clients",
        "rounds",
        "local_epochs",
        "lora_rank",
        "batch_size",
        "n_estimators",
        "min_samples_leaf",
    ):
        if getattr(config, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}"
            )
    if config.max_train is not None and config.max_train < config.num_clients:
        raise ValueError(
            f"--max-train {config.max_train} is below --num-clients {config.num_clients}"
        )
    if not config.betas or any(not beta > 0 for beta in config.betas):
        raise ValueError(f"--betas must be one or more values > 0, got {config.betas}")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"--seeds must be one or more distinct seeds, got {config.seeds}")
    if not 0 < config.holdout_fraction < 1:
        raise ValueError(f"--holdout-fraction must be in (0, 1), got {config.holdout_fraction}")
    if config.lr <= 0 or config.weight_decay < 0:
        raise ValueError(
            f"--lr must be > 0 and --weight-decay >= 0, got {config.lr}, {config.weight_decay}"
        )
