"""``--to peft``: a peft LoRA adapter relative to W0.

Factors as trained where the run kept them (``lora_merge`` ``factors``/``released``); otherwise
(``product`` runs fold every round into the frozen weights) the SVD of each layer's cumulative
update ``W_final - W0``, at the largest numerical rank over the layers by default, so the
adapter is exact, or at ``--rank`` (a truncation whose loss per layer the export reports)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import write_json, write_text
from livar_merge.apps.export.check import EXACT_RELATIVE_ERROR, CheckData, checked_record
from livar_merge.apps.export.source import (
    PEFT_FILES,
    REPORT_FILE,
    LoadedRun,
    Say,
    create_timm,
    model_record,
    sha256_label,
)

if TYPE_CHECKING:
    import torch


BASE_POLICIES = ("auto", "include", "omit")
BASE_FILE = "base_model.safetensors"


# ------------------------------------------------------------------------------- peft
@dataclass
class Adapter:
    """LoRA factors per layer (timm module names) and how they were obtained."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A [r, k], B [d, r])
    rank: int
    alpha: float
    method: str
    layers: list[dict[str, Any]]  # per layer: shape, update rank, relative error

    @property
    def max_relative_error(self) -> float:
        return max((layer["relative_error"] for layer in self.layers), default=0.0)

    @property
    def exact(self) -> bool:
        return self.max_relative_error <= EXACT_RELATIVE_ERROR


def max_update_rank(adapter: Adapter) -> int | None:
    """The largest numerical rank of a layer's update (None: factors as trained)."""
    ranks = [layer["update_rank"] for layer in adapter.layers if "update_rank" in layer]
    return max(ranks) if ranks else None


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Singular values ``s`` (descending) above ``s[0] * max(d, k) * eps(float32)``: the rank
    a float32 update can be told to have (``numpy.linalg.matrix_rank``'s rule)."""
    import torch

    if len(s) == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * float(torch.finfo(torch.float32).eps)
    return int((s > tol).sum())


def svd_factors(
    delta: torch.Tensor,
    rank: int,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(A [rank, k], B [d, rank], stats)`` with ``B A`` the truncated SVD of ``delta`` (float64,
    singular values split evenly; zero-padded beyond ``min(d, k)``); stats: the update's
    numerical rank, its Frobenius norm and the relative Frobenius error of the truncation.
    ``svd``: ``delta``'s float64 SVD if already computed."""
    import torch

    from livar_merge.lora import balanced_factors

    u, s, vh = svd if svd is not None else torch.linalg.svd(delta.double(), full_matrices=False)
    d, k = delta.shape
    small_b, small_a = balanced_factors(u, s, vh, rank)  # the package's one SVD split
    keep = small_a.shape[0]
    factor_b = torch.zeros(d, rank, dtype=torch.float64)
    factor_a = torch.zeros(rank, k, dtype=torch.float64)
    factor_b[:, :keep] = small_b
    factor_a[:keep] = small_a
    total = float(s.square().sum())
    tail = float(s[keep:].square().sum())
    stats = {
        "shape": [int(d), int(k)],
        "update_rank": numerical_rank(s, (d, k)),
        "update_norm": math.sqrt(total),
        "relative_error": math.sqrt(tail / total) if total > 0 else 0.0,
    }
    return factor_a.float(), factor_b.float(), stats


def adapter_of(run: LoadedRun, rank: int | None) -> Adapter:
    """The adapter of the final global model relative to W0 (module docstring)."""
    import torch

    from livar_merge.lora_view import (
        base_weight,
        find_lora_parameters,
        peft_scalings,
        short_layer_name,
    )

    config = run.config
    lora = find_lora_parameters(run.model)
    modules = dict(run.model.named_modules())
    as_trained = config.lora_merge != "product" and rank in (None, config.lora_rank)
    if as_trained:
        factors = {}
        layers = []
        for layer, (factor_a, factor_b) in lora.items():
            name = short_layer_name(layer)
            factors[name] = (factor_a.detach().clone(), factor_b.detach().clone())
            shape = [int(factor_b.shape[0]), int(factor_a.shape[1])]
            layers.append({"layer": name, "shape": shape, "relative_error": 0.0})
        method = "LoRA factors as trained"
        return Adapter(factors, config.lora_rank, config.lora_alpha, method, layers)
    scalings = peft_scalings(run.model)
    deltas, svds = {}, {}
    with torch.no_grad():
        for layer, (factor_a, factor_b) in lora.items():
            name = short_layer_name(layer)
            base = base_weight(modules[layer]).double()
            delta = base - run.pretrained[f"{name}.weight"].double()
            delta += scalings[layer] * (factor_b.double() @ factor_a.double())
            deltas[name] = delta
            svds[name] = torch.linalg.svd(delta, full_matrices=False)
    exact_rank = max(
        (numerical_rank(s, deltas[n].shape) for n, (_, s, _) in svds.items()), default=1
    )
    target = rank if rank is not None else max(1, exact_rank)
    factors, layers = {}, []
    for name, delta in deltas.items():
        new_a, new_b, stats = svd_factors(delta, target, svds[name])
        factors[name] = (new_a, new_b)
        layers.append({"layer": name, "rank": target, **stats})
    what = "folded weights - W0 + the current LoRA" if config.lora_merge == "product" else "LoRA"
    how = "the largest numerical rank of a layer's update" if rank is None else "--rank"
    method = f"SVD at rank {target} ({how}) of the cumulative update ({what})"
    return Adapter(factors, target, float(target), method, layers)


def peft_model_of(run: LoadedRun, adapter: Adapter) -> torch.nn.Module:
    """A fresh timm model holding W0 with the adapter and the final head as peft LoRA."""
    import peft
    import torch

    from livar_merge.federated.model import LORA_TARGET_REGEX
    from livar_merge.lora_view import (
        PEFT_PREFIX,
        factor_key,
        head_module,
        lora_config,
        parameter_name,
    )

    base = create_timm(run)
    base.load_state_dict(run.pretrained, strict=True)
    config = lora_config(rank=adapter.rank, alpha=adapter.alpha, target_modules=LORA_TARGET_REGEX)
    model = peft.get_peft_model(base, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (factor_a, factor_b) in adapter.factors.items():
            layer = PEFT_PREFIX + name
            params[parameter_name(factor_key(layer, "A"))].copy_(factor_a)
            params[parameter_name(factor_key(layer, "B"))].copy_(factor_b)
        final, head = head_module(run.model), head_module(model)
        head.weight.copy_(final.weight)
        if head.bias is not None and final.bias is not None:
            head.bias.copy_(final.bias)
    model.eval()
    return model


def hub_checkpoint_text(record: dict[str, Any] | None) -> str:
    """``"; the run's W0 was <file> of <hub id> ..., sha256 <hex>"`` for a Hugging Face cache
    record (:func:`~livar_merge.federated.model.hf_cache_provenance`), else ``""``."""
    if not record or record.get("source") != "hf-cache":
        return ""
    revision = f" at revision {record['revision']}" if record.get("revision") else ""
    return (
        f"; the run's W0 was {record['filename']} of {record['hub_id']}{revision}, sha256 "
        f"{record['sha256']} (check the file timm loads against it)"
    )


def base_policy(run: LoadedRun, base: str) -> tuple[bool, str]:
    """Whether to write W0 beside the adapter, and how a user gets W0."""
    from livar_merge.lora_view import HEAD_OPTION

    from_hub = run.info.weights.startswith("hf-cache:")
    include = base == "include" or (base == "auto" and not from_hub)
    model = run.config.model
    if include:
        how = (
            f"{BASE_FILE} in this folder: the complete timm state dict of W0 (the head in it is "
            f"the run's initial head; the adapter's {HEAD_OPTION} replaces it)"
        )
    elif from_hub:
        how = (
            f"timm's pretrained checkpoint of {model}: timm.create_model({model!r}, "
            "pretrained=True, num_classes=num_classes, **create_kwargs)"
            f"{hub_checkpoint_text(run.info.weights_provenance)}"
        )
    else:
        how = (
            f"NOT written (--base omit): W0 is {run.info.weights!r}, which timm alone cannot "
            "recreate; rebuild it with livar (livar_merge.federated.federation."
            "build_seeded_model with the run's config and seed) or export with --base include"
        )
    return include, how


def readme_text(record: dict[str, Any]) -> str:
    """The README.md of a peft export: what it is, whether it is exact, how to load it."""
    from livar_merge.lora_view import HEAD_OPTION

    kwargs = ", ".join(f"{k}={v!r}" for k, v in record["create_kwargs"].items())
    base_line = (
        f'model.load_state_dict(load_file("{BASE_FILE}"), strict=True)\n'
        if record["base"]["file"]
        else "# load W0 into model first: see 'Base' below\n"
    )
    errors = "\n".join(
        f"| {layer['layer']} | {layer.get('update_rank', '-')} | {layer['relative_error']:.3e} |"
        for layer in record["layers"]
    )
    check = record["check"]
    run = record["run"]
    return f"""# LIVAR federated model: peft LoRA adapter

Exported by `livar-export` from the run `{run["name"]}` ({run["folder"]}): round
{run["completed_rounds"]} of {run["rounds"]}, merge mode `{run["lora_merge"]}`.

* **Exact: {"yes" if record["exact"] else "no"}.** {record["exactness"]}.
* Adapter: {record["method"]}; rank {record["rank"]}, lora_alpha {record["lora_alpha"]},
  target modules `{record["target_modules"]}`, the head as `{HEAD_OPTION}`.
* Check on the {check["inputs"]} ({check["samples"]} samples): max abs logit difference to the
  run's final global model {check["max_abs_logit_diff"]:.3e}; top-1 {check["exported_top1"]}
  (the run's model {check["run_model_top1"]}; metrics.csv's final test accuracy
  {check["run_final_test_accuracy"]}).
* An exact export of any run: `livar-export RUN_DIR --to timm FILE` (a merged timm state dict).

## Base

{record["base"]["how"]}

## Loading

```python
import timm
from peft import PeftModel
from safetensors.torch import load_file

model = timm.create_model({record["model"]!r}, pretrained=False,
                          num_classes={record["num_classes"]}, {kwargs})
{base_line}model = PeftModel.from_pretrained(model, "path/to/this/folder").eval()
```

Inputs: {record["input"]["note"]}; image_size {record["input"]["image_size"]},
mean {record["input"]["mean"]}, std {record["input"]["std"]}.

## Layers (relative Frobenius error of the adapter's update)

| layer | update rank | relative error |
|---|---|---|
{errors}
"""


def export_peft(
    run: LoadedRun,
    out: Path,
    data: CheckData,
    *,
    rank: int | None = None,
    base: str = "auto",
    say: Say = print,
) -> dict[str, Any]:
    """Write the adapter folder (peft ``save_pretrained``, W0 per ``base``, README.md,
    export.json); returns the export.json record."""
    import peft
    from safetensors.torch import load_file, save_file

    from livar_merge.federated.model import LORA_TARGET_REGEX

    say("factorising the update of every LoRA layer")
    adapter = adapter_of(run, rank)
    model = peft_model_of(run, adapter)
    out.mkdir(parents=True, exist_ok=True)
    peft_model: Any = model
    peft_model.save_pretrained(str(out))
    include, how = base_policy(run, base)
    if include:
        save_file(run.pretrained, str(out / BASE_FILE), metadata={"format": "pt"})
    say(f"wrote {out}; loading it back with PeftModel.from_pretrained")
    fresh = create_timm(run)
    fresh.load_state_dict(
        load_file(str(out / BASE_FILE)) if include else run.pretrained, strict=True
    )
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    if adapter.exact:
        exactness = (
            "the adapter's update equals the run's (LoRA factors as trained)"
            if adapter.method.startswith("LoRA factors")
            else f"every layer's update has rank <= {adapter.rank}: the SVD keeps all of it"
        )
    else:
        exactness = (
            f"the cumulative update has a higher rank than {adapter.rank}: the truncation "
            f"loses up to {adapter.max_relative_error:.3g} of a layer's update (relative "
            "Frobenius error, per layer below); for an exact adapter leave --rank out "
            f"(rank {max_update_rank(adapter)} here), or use --to timm"
        )
        say(f"--rank {adapter.rank} truncates: {exactness}")
    written = [*PEFT_FILES, BASE_FILE] if include else list(PEFT_FILES)
    record: dict[str, Any] = {
        "format": "peft",
        "exact": adapter.exact,
        "exactness": exactness,
        "method": adapter.method,
        "rank": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": LORA_TARGET_REGEX,
        "files": {name: sha256_label(out / name) for name in written},
        **model_record(run),
        "base": {"file": BASE_FILE if include else None, "weights": run.info.weights, "how": how},
        "max_relative_error": adapter.max_relative_error,
        "max_update_rank": max_update_rank(adapter),
        "layers": adapter.layers,
        **checked_record(run, loaded, data, exact=adapter.exact),
    }
    write_text(out / "README.md", readme_text(record))
    write_json(out / REPORT_FILE, record)
    return record
