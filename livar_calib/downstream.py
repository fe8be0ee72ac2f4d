"""Downstream check of a table on held-out proxy repeats: merged-model accuracy, paired.

For a held-out repeat (round ``r`` of a (beta, seed) proxy run) every scheme merges the *same*
client updates: the model at the round's start (the seeded backbone with the deltas of rounds
``1..r-1`` folded in, as the proxy training chose: joint or FedAvg), plus
``sum_m w_m^l dW_m^l`` per layer with the scheme's weights ``w`` (a table's alpha, FedAvg's
``n_m / N``, the NNLS oracle's lambda), and the clients' FedAvg head (the tables weight the LoRA
merge only: the proxy clients do not collect the class feature variance of LIVAR's head merge).
The merged model is scored on the proxy's test set (``max_test`` images, stratified);
``difference`` is each scheme's accuracy minus FedAvg's on the same repeat, and the summary
gives its mean with a t interval over held-out runs (:mod:`livar_calib.intervals`).

Needs the heads each proxy round saves (``round_<r>_heads.safetensors``); calibrations run
before they were saved have none, and the check says so and is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from livar_calib.config import CalibConfig
from livar_calib.deltas import RepeatDeltas, load_repeat
from livar_calib.intervals import per_run, t_interval
from livar_calib.proxy import HEADS_FILE, ProxyRun, proxy_runs
from livar_calib.quality import FEDAVG, ORACLE, _matrix, scheme_weights
from livar_merge.errors import MissingHeadsError
from livar_merge.fedavg import fedavg_head
from livar_merge.federated.federation import build_federation
from livar_merge.federated.model import head_state, set_head
from livar_merge.lora_view import base_weight, find_lora_parameters, fold_into_base

if TYPE_CHECKING:
    import pandas as pd

    from livar_merge.tables import GShapTable

JOINT = "joint"


def _dense(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> torch.Tensor:
    """``sum_m w_m U_m V_m`` ``[d, k]`` in float64."""
    total = sum(w * (u @ v) for w, (u, v) in zip(weights, factors, strict=True))
    return torch.from_numpy(np.asarray(total, dtype=np.float64))


def _load_heads(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingHeadsError(
            f"{path} is missing: this calibration's proxy training predates the downstream "
            "check (it saves the heads of every round); rerun it into a new --out"
        )
    return load_file(str(path))


def _set_fedavg_head(
    model: torch.nn.Module, heads: Mapping[str, torch.Tensor], n: np.ndarray, clients: int
) -> None:
    """Set the head to the sample-weighted mean of the clients' heads (merged in float64)."""
    weights = [heads[f"client/{m}/weight"].double() for m in range(clients)]
    biases = (
        None
        if "client/0/bias" not in heads
        else [heads[f"client/{m}/bias"].double() for m in range(clients)]
    )
    merged = fedavg_head(weights, biases, n)
    set_head(model, merged.weight, merged.bias)


def downstream_report(
    config: CalibConfig,
    root: Path,
    rows: pd.DataFrame,
    repeat_ids: Sequence[str],
    tables: Mapping[str, GShapTable],
    *,
    log: Any = print,
) -> pd.DataFrame:
    """Accuracy of each scheme's merged model per held-out repeat (module docstring).

    Returns ``repeat_id, scheme, test_accuracy, test_loss, difference`` (difference: minus
    FedAvg's accuracy on the same repeat), schemes: the tables, ``fedavg``, ``nnls-oracle``
    and the ``joint`` model (the target the merges approximate).
    """
    import pandas as pd

    wanted = set(repeat_ids)
    records = []
    for run in proxy_runs(config):
        rounds = [r for r in range(1, config.rounds + 1) if run.repeat_id(r) in wanted]
        if rounds:
            records += _run_records(config, root, run, rounds, rows, tables, log)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    fedavg = frame.loc[frame["scheme"] == FEDAVG].set_index("repeat_id")["test_accuracy"]
    frame["difference"] = frame["test_accuracy"] - frame["repeat_id"].map(fedavg)
    return frame


@dataclass
class RoundStart:
    """A proxy round as it began: its deltas and heads, the clients' sample counts ``n [M]``
    and the frozen weights of the LoRA layers at its start (``base``, float32)."""

    round: int
    deltas: RepeatDeltas
    heads: dict[str, torch.Tensor]
    n: np.ndarray
    base: dict[str, torch.Tensor]


def round_starts(
    config: CalibConfig, folder: Path, model: torch.nn.Module, last: int
) -> Iterator[RoundStart]:
    """Walk rounds ``1..last`` of the proxy run in ``folder`` from the seeded ``model`` (as
    built for it): yields each round's start, then folds the delta the proxy training chose
    (joint or FedAvg, ``config.next_start``) and sets the next head, as
    :meth:`livar_calib.proxy.ProxyTrainer._advance` did (from the saved float64 factors: equal
    to the training's float32 fold up to rounding). LoRA B is zeroed: only folded weights act."""
    factors = find_lora_parameters(model)
    layers = list(factors)
    with torch.no_grad():
        for _, factor_b in factors.values():
            factor_b.zero_()
    modules = dict(model.named_modules())
    base = {layer: base_weight(modules[layer]).detach().clone() for layer in layers}
    for r in range(1, last + 1):
        deltas = load_repeat(folder / f"round_{r}.safetensors")
        heads = _load_heads(folder / HEADS_FILE.format(round=r))
        clients = len(deltas.clients)
        n = np.array([float(heads[f"client/{m}/num_samples"]) for m in range(clients)])
        yield RoundStart(r, deltas, heads, n, dict(base))
        if config.next_start == "joint":
            step = {layer: torch.from_numpy(_joint(deltas, layer)) for layer in layers}
            set_head(model, heads["joint/weight"], heads.get("joint/bias"))
        else:
            share = n / n.sum()
            step = {layer: _dense(deltas.client_factors[layer], share) for layer in layers}
            _set_fedavg_head(model, heads, n, clients)
        for layer in layers:
            base[layer] = base[layer] + step[layer].to(base[layer])
        _install(model, base, {})


def _run_records(
    config: CalibConfig,
    root: Path,
    run: ProxyRun,
    rounds: list[int],
    rows: pd.DataFrame,
    tables: Mapping[str, GShapTable],
    log: Any,
) -> list[dict[str, Any]]:
    fed = build_federation(config, dataset=config.proxy, seed=run.seed, beta=run.beta)
    records = []
    for start in round_starts(config, root / "proxy" / run.run_id, fed.model, max(rounds)):
        if start.round in rounds:
            records += _score_repeat(fed.model, fed, start, rows, tables)
            log(f"downstream: {start.deltas.repeat_id} scored")
    return records


def _joint(deltas: RepeatDeltas, layer: str) -> np.ndarray:
    u, v = deltas.joint_factors[layer]
    return u @ v


def _install(
    model: torch.nn.Module, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, weight in base.items():
            base_weight(modules[layer]).copy_(weight)
    fold_into_base(model, {layer: d for layer, d in delta.items() if layer in base})


def _score_repeat(
    model: torch.nn.Module,
    fed: Any,
    start: RoundStart,
    rows: pd.DataFrame,
    tables: Mapping[str, GShapTable],
) -> list[dict[str, Any]]:
    """Every scheme's merged model of one repeat, from its start (weights and head)."""
    deltas, heads, n, base = start.deltas, start.heads, start.n, start.base
    layers = list(deltas.layers)
    sub = rows.loc[rows["repeat_id"].astype(str) == str(deltas.repeat_id)]
    weights = scheme_weights(deltas, sub, tables)
    weights[ORACLE] = _matrix(sub, "lam", deltas)
    start_head = head_state(model)
    clients = len(deltas.clients)
    records = []
    schemes = {**{k: v for k, v in weights.items()}, JOINT: None}
    for scheme, w in schemes.items():
        if w is None:
            delta = {layer: torch.from_numpy(_joint(deltas, layer)) for layer in layers}
            set_head(model, heads["joint/weight"], heads.get("joint/bias"))
        else:
            delta = {
                layer: _dense(deltas.client_factors[layer], w[:, l])
                for l, layer in enumerate(layers)
            }
            _set_fedavg_head(model, heads, n, clients)
        _install(model, base, delta)
        accuracy, loss = fed.evaluate(model)
        records.append(
            {
                "repeat_id": deltas.repeat_id,
                "scheme": scheme,
                "test_accuracy": accuracy,
                "test_loss": loss,
            }
        )
    _install(model, base, {})
    set_head(model, *start_head)
    return records


def summarise_downstream(frame: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per scheme: mean accuracy, mean paired difference to FedAvg, its t interval over
    held-out runs (``diff_low``/``diff_high``: a run's rounds averaged first; NaN below
    :data:`~livar_calib.intervals.MIN_HELDOUT_RUNS` runs), the repeats and runs, best first."""
    import pandas as pd

    per_repeat = frame.pivot(index="repeat_id", columns="scheme", values="difference")
    runs = per_run(per_repeat)
    mean, low, high = t_interval(runs.to_numpy(), level=level)
    summary = pd.DataFrame(
        {
            "test_accuracy": frame.groupby("scheme")["test_accuracy"].mean(),
            "difference": pd.Series(mean, index=runs.columns),
            "diff_low": pd.Series(low, index=runs.columns),
            "diff_high": pd.Series(high, index=runs.columns),
            "repeats": per_repeat.count(axis=0),
            "runs": runs.count(axis=0),
        }
    )
    return summary.sort_values("test_accuracy", ascending=False, kind="stable")
