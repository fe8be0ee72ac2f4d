"""Stage 1 of the calibration: federated and joint training on the proxy dataset (Section 4.1).

For every (beta, seed) a Dirichlet split over M clients is drawn. Each round, the M clients and
one joint model trained on the union of their data start from the same weights and the same
LoRA initialisation (B = 0, a seeded Kaiming A) and train for the same number of local epochs.
Because B starts at zero, each trainee's round delta is exactly ``s B A`` (rank r); it is stored as
factors ``(s B, A)``. Per client and layer the round records omega_A, omega_B and the sample count:
one *repeat*. The next round starts from the joint model's state (``next_start="joint"``) or
from the clients' sample-weighted merge (``"fedavg"``): the delta is folded into the frozen
weights and the LoRA restarts.

Outputs under ``<run>/proxy/b<beta>-s<seed>/``: ``round_<r>.safetensors`` (the repeat's deltas),
``round_<r>.csv`` (its rows), ``round_<r>_heads.safetensors`` (every trainee's head and sample
count: :mod:`livar_calib.downstream` rebuilds merged models from them), ``partition.csv``, and
``state.safetensors`` (the model state after the last completed round, for resuming).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from livar_calib.config import CalibConfig
from livar_calib.deltas import RepeatDeltas, save_repeat
from livar_calib.intervals import repeat_id
from livar_merge._io import save_tensors, write_csv, write_text
from livar_merge.aggregation import ClientUpdate
from livar_merge.aggregation.common import client_head_biases
from livar_merge.engines.ray_engine import EngineOptions, FolderTask, run_folder_tasks
from livar_merge.fedavg import fedavg_head, fedavg_lora
from livar_merge.federated.client import train_client
from livar_merge.federated.data import derive_seed
from livar_merge.federated.federation import build_federation, client_id
from livar_merge.federated.model import restore_parameters, snapshot_trainable
from livar_merge.lora import exact_product
from livar_merge.lora_view import (
    factor_key,
    fold_into_base,
    head_module,
    is_base_parameter,
    is_trained_head_parameter,
    restart_lora,
)

HEADS_FILE = "round_{round}_heads.safetensors"


def round_heads(updates: list[ClientUpdate], joint: ClientUpdate) -> dict[str, torch.Tensor]:
    """``client/<m>/{weight,bias,num_samples}`` and ``joint/{weight,bias}`` of one round."""
    heads: dict[str, torch.Tensor] = {}
    for prefix, update in [*((f"client/{m}", u) for m, u in enumerate(updates)), ("joint", joint)]:
        heads[f"{prefix}/weight"] = update.head_weight.detach().float().contiguous().cpu()
        if update.head_bias is not None:
            heads[f"{prefix}/bias"] = update.head_bias.detach().float().contiguous().cpu()
        heads[f"{prefix}/num_samples"] = torch.tensor([update.num_samples], dtype=torch.int64)
    return heads


@dataclass(frozen=True)
class ProxyRun:
    beta: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"b{self.beta:g}-s{self.seed}"

    def repeat_id(self, round_index: int) -> str:
        return repeat_id(self.run_id, round_index)


def proxy_runs(config: CalibConfig) -> list[ProxyRun]:
    return [ProxyRun(beta, seed) for beta in config.betas for seed in config.seeds]


class ProxyTrainer:
    """Runs the proxy training of one (beta, seed), round by round, resumable."""

    def __init__(self, config: CalibConfig, run: ProxyRun, folder: Path) -> None:
        self.config, self.run, self.folder = config, run, folder
        self.fed = build_federation(config, dataset=config.proxy, seed=run.seed, beta=run.beta)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(
            folder / "partition.csv", self.fed.partition_table, index=True, index_label="client"
        )
        self.union = np.sort(np.concatenate(self.fed.parts))

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().contiguous().cpu()
            for n, p in self.fed.model.named_parameters()
            if is_base_parameter(n) or is_trained_head_parameter(n)
        }

    def save_state(self, round_index: int) -> None:
        save_tensors(self.folder / "state.safetensors", self._state_tensors())
        write_text(self.folder / "state.json", json.dumps({"completed_rounds": round_index}))

    def load_state(self) -> None:
        params = dict(self.fed.model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(self.folder / "state.safetensors")).items():
                params[name].copy_(value)

    # ----------------------------------------------------------------- rounds
    def _factors(self, update: ClientUpdate) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (s B, A)}`` of an update whose round started from B = 0."""
        out = {}
        for layer in self.fed.info.lora_layers:
            b = update.lora[factor_key(layer, "B")].double().cpu().numpy()
            a = update.lora[factor_key(layer, "A")].double().cpu().numpy()
            out[layer] = (self.fed.scalings[layer] * b, a)
        return out

    def run_round(
        self, round_index: int
    ) -> tuple[Any, list[dict[str, Any]], dict[str, torch.Tensor]]:
        """Train clients and the joint model from one start; returns (RepeatDeltas, rows,
        heads)."""

        seed = derive_seed(self.run.seed, round_index, "calib-lora-init")
        restart_lora(self.fed.model, self.fed.info.lora_layers, seed)
        start = snapshot_trainable(self.fed.model)
        partial = self.folder / f"round_{round_index}_partial"
        partial.mkdir(exist_ok=True)
        trainees = [
            (client_id(m), part, frozenset({"omega"})) for m, part in enumerate(self.fed.parts)
        ] + [("joint", self.union, frozenset())]
        done = []
        for trainee, indices, needs in trainees:
            cached = partial / f"{trainee}.safetensors"
            if cached.is_file():  # finished before an interruption: identical by construction
                done.append(load_update(cached))
                continue
            restore_parameters(self.fed.model, start)
            update, _ = train_client(
                self.fed.model,
                self.fed.train_source,
                indices,
                client_id=trainee,
                num_classes=self.fed.num_classes,
                settings=self.fed.settings,
                seed=self.run.seed,
                round_index=round_index,
                needs=needs,
            )
            save_update(cached, update)
            done.append(update)
        done = [_on_cpu(u) for u in done]
        updates, joint = done[:-1], done[-1]
        layers = list(self.fed.info.lora_layers)
        client_factors = [self._factors(u) for u in updates]
        deltas = RepeatDeltas(
            repeat_id=self.run.repeat_id(round_index),
            layers=layers,
            clients=[u.client_id for u in updates],
            client_factors={layer: [f[layer] for f in client_factors] for layer in layers},
            joint_factors=self._factors(joint),
        )
        rows = []
        for u in updates:
            for l, layer in enumerate(layers):
                rows.append(
                    {
                        "repeat_id": deltas.repeat_id,
                        "beta": self.run.beta,
                        "seed": self.run.seed,
                        "round": round_index,
                        "client": u.client_id,
                        "layer": layer,
                        "omega_a": float(u.omega_a[l]),
                        "omega_b": float(u.omega_b[l]),
                        "num_samples": u.num_samples,
                    }
                )
        heads = round_heads(updates, joint)
        self._advance(round_index, updates, joint, start)
        return deltas, rows, heads

    def _advance(
        self,
        round_index: int,
        updates: list[ClientUpdate],
        joint: ClientUpdate,
        start: dict[str, torch.Tensor],
    ) -> None:
        """Fold the chosen round result into the frozen weights and set the head."""

        restore_parameters(self.fed.model, start)
        modules = self.fed.info.lora_layers
        head = head_module(self.fed.model)
        with torch.no_grad():
            if self.config.next_start == "joint":
                deltas = {
                    layer: exact_product(
                        joint.lora[factor_key(layer, "B")],
                        joint.lora[factor_key(layer, "A")],
                        self.fed.scalings[layer],
                    )
                    for layer in modules
                }
                head.weight.copy_(joint.head_weight)
                if head.bias is not None:
                    assert joint.head_bias is not None  # trained from this head
                    head.bias.copy_(joint.head_bias)
            else:
                n = [u.num_samples for u in updates]
                merged = fedavg_lora(
                    [u.lora for u in updates], n, mode="product", scaling=self.fed.scalings
                )
                deltas = {layer: merged[layer].to_dense() for layer in modules}
                merged_head = fedavg_head(
                    [u.head_weight for u in updates], client_head_biases(updates), n
                )
                head.weight.copy_(merged_head.weight)
                if head.bias is not None:
                    assert merged_head.bias is not None  # the clients trained this head
                    head.bias.copy_(merged_head.bias)
        fold_into_base(self.fed.model, deltas)

    def rounds(self) -> Iterator[int]:
        """Train the remaining rounds, saving each; yields the completed round numbers."""

        done = _completed(self.folder)
        if done:
            self.load_state()
        for r in range(done + 1, self.config.rounds + 1):
            deltas, rows, heads = self.run_round(r)
            save_repeat(self.folder / f"round_{r}.safetensors", deltas)
            save_tensors(self.folder / HEADS_FILE.format(round=r), heads)
            write_csv(self.folder / f"round_{r}.csv", rows)
            self.save_state(r)
            shutil.rmtree(self.folder / f"round_{r}_partial", ignore_errors=True)
            yield r


def train_proxy_run(config: CalibConfig, run: ProxyRun, folder: Path) -> Iterator[int]:
    """The remaining rounds of one (beta, seed) in ``folder``; yields each completed round (a
    task of the ray engine: :mod:`livar_merge.engines.ray_engine`)."""
    yield from ProxyTrainer(config, run, folder).rounds()


def run_proxy_training(
    config: CalibConfig, root: Path, engine: EngineOptions | None = None
) -> list[Path]:
    """Stage 1 for every (beta, seed): returns the folders. Completed rounds are skipped. On
    ``engine.engine == "ray"`` the unfinished runs are Ray tasks whose rounds are written into
    the same folders as they finish (same files as the serial engine)."""
    runs = proxy_runs(config)
    folders = [root / "proxy" / run.run_id for run in runs]
    total = len(runs) * config.rounds
    done = sum(_completed(folder) for folder in folders)
    remaining = [
        (run, folder)
        for run, folder in zip(runs, folders, strict=True)
        if _completed(folder) < config.rounds
    ]
    with tqdm(
        total=total, initial=done, disable=not config.progress, unit="round", desc="proxy training"
    ) as bar:
        if engine is not None and engine.engine == "ray":
            tasks = [
                FolderTask(run.run_id, folder, partial(train_proxy_run, config, run))
                for run, folder in remaining
            ]
            run_folder_tasks(tasks, engine, on_report=lambda task, _: bar.update(1))
        else:
            for run, folder in remaining:
                for _ in train_proxy_run(config, run, folder):
                    bar.update(1)
    return folders


def completed_rounds(config: CalibConfig, root: Path) -> int:
    """Rounds saved so far over every (beta, seed) proxy run of ``root``."""
    return sum(_completed(root / "proxy" / run.run_id) for run in proxy_runs(config))


def _completed(folder: Path) -> int:
    """Rounds of the proxy run in ``folder`` saved so far (``state.json``; 0 before the first)."""
    path = folder / "state.json"
    return json.loads(path.read_text())["completed_rounds"] if path.is_file() else 0


def _on_cpu(update: Any) -> Any:
    """The update with its tensors on the CPU (cached and fresh updates mix in one round)."""
    update.lora = {k: v.cpu() for k, v in update.lora.items()}
    update.head_weight = update.head_weight.cpu()
    update.head_bias = None if update.head_bias is None else update.head_bias.cpu()
    return update


def save_update(path: Path, update: Any) -> None:
    """One trainee's finished round (LoRA factors, head, omegas, sample count) as safetensors."""
    tensors = {f"lora/{k}": v.contiguous().cpu() for k, v in update.lora.items()}
    tensors["head/weight"] = update.head_weight.contiguous().cpu()
    if update.head_bias is not None:
        tensors["head/bias"] = update.head_bias.contiguous().cpu()
    if update.omega_a is not None:
        tensors["omega/a"] = torch.as_tensor(update.omega_a)
        tensors["omega/b"] = torch.as_tensor(update.omega_b)
    meta = {
        "client_id": update.client_id,
        "num_samples": str(update.num_samples),
        "layer_names": json.dumps(list(update.layer_names)),
    }
    save_tensors(path, tensors, meta)


def load_update(path: Path) -> Any:

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    omega_a = tensors.get("omega/a")
    omega_b = tensors.get("omega/b")
    return ClientUpdate(
        client_id=meta["client_id"],
        num_samples=int(meta["num_samples"]),
        lora={k[5:]: v for k, v in tensors.items() if k.startswith("lora/")},
        head_weight=tensors["head/weight"],
        head_bias=tensors.get("head/bias"),
        layer_names=tuple(json.loads(meta["layer_names"])),
        omega_a=None if omega_a is None else omega_a.numpy(),
        omega_b=None if omega_b is None else omega_b.numpy(),
    )
