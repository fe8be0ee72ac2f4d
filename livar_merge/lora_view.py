"""One LoRA view of a peft model: the only home of peft's names and of what touches its LoRA.

Names. A peft model names a LoRA factor with its adapter,
``<layer>.lora_A.default.weight`` ``[r, k]`` and ``<layer>.lora_B.default.weight`` ``[d, r]``;
``peft.get_peft_model_state_dict`` drops the adapter (``<layer>.lora_A.weight``), and that is the
name of a factor everywhere in livar (``ClientUpdate.lora``, the Flower wire, checkpoints):
:func:`factor_key`, :func:`parse_factor_key`, :func:`lora_key` / :func:`parameter_name`. The
frozen weight of a LoRA layer is ``<layer>.base_layer.weight`` (:func:`is_base_parameter`); the
timm model sits at ``base_model.model`` and its trained head is peft's ``modules_to_save`` copy
(:func:`head_module`).

Layers are found by type (peft's ``LoraLayer`` holding the adapter; :func:`lora_layers`), never by
attribute sniffing. On them: the factors (:func:`find_lora_parameters`, :func:`lora_state`),
scalings, folding a merge into the frozen weights (:func:`fold_into_base`), restarting factors
(:func:`restart_lora`), loading merged factors with zero/random padding below the model's rank
(:func:`load_factors`), temporary frozen weights (:func:`frozen_weights`), checksums
(:func:`base_checksum`, :func:`frozen_checksum`) and the target checks
(:func:`check_lora_targets`). A test fails when a peft key literal appears in any other module.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol, cast

import torch

from livar_merge.errors import GlobalStateError

ADAPTER = "default"  # the peft adapter livar builds and reads (one adapter per model)
HEAD = "head"  # the timm head, trained as peft's modules_to_save
HEAD_OPTION = "modules_to_save"  # the LoraConfig option (and module) of the trained head copy
PEFT_PREFIX = "base_model.model."  # a peft model's parameter names start with it
Factor = Literal["A", "B"]
_FACTOR_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_BASE = ".base_layer."


class LoraModule(Protocol):
    """What livar reads of a peft ``LoraLayer`` (a Linear wrapped with LoRA factors)."""

    lora_A: torch.nn.ModuleDict
    lora_B: torch.nn.ModuleDict
    scaling: dict[str, float]
    use_dora: dict[str, bool]

    def get_base_layer(self) -> torch.nn.Module: ...

    def get_parameter(self, target: str) -> torch.nn.Parameter: ...

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool) -> None: ...


# ------------------------------------------------------------------------------------ names
def factor_key(layer: str, which: Factor, adapter: str | None = None) -> str:
    """``<layer>.lora_<which>.weight`` (``<layer>.lora_<which>.<adapter>.weight`` with one)."""
    infix = f".{adapter}" if adapter else ""
    return f"{layer}.lora_{which}{infix}.weight"


def parse_factor_key(key: str) -> tuple[str, Factor, str | None] | None:
    """``(layer, "A" | "B", adapter or None)`` of a LoRA factor key, None for any other key."""
    match = _FACTOR_KEY.match(key)
    if match is None:
        return None
    return match["layer"], cast(Factor, match["which"]), match["adapter"]


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA factor."""
    return ".lora_A." in name or ".lora_B." in name


def is_factor_b(key: str) -> bool:
    """Whether a LoRA factor key names ``B [d, r]`` (else ``A [r, k]``)."""
    return ".lora_B." in key


def is_base_parameter(name: str) -> bool:
    """Whether a parameter is the frozen weight (or bias) of a LoRA layer."""
    return _BASE in name


def is_trained_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to peft's trained copy of the head."""
    return HEAD_OPTION in name


def layer_of(key: str) -> str:
    """The LoRA layer of a factor key (``<layer>.lora_A.weight`` -> ``<layer>``)."""
    return key.split(".lora_")[0]


def lora_key(parameter: str, adapter: str = ADAPTER) -> str:
    """``<layer>.lora_A.default.weight`` -> ``<layer>.lora_A.weight`` (peft state-dict key)."""
    return parameter.replace(f".{adapter}.", ".")


def parameter_name(key: str, adapter: str = ADAPTER) -> str:
    """Inverse of :func:`lora_key`: ``<l>.lora_B.weight`` -> ``<l>.lora_B.default.weight``."""
    return key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")


def factor_ranks(lora: Mapping[str, torch.Tensor]) -> set[int]:
    """The ranks of a LoRA state (``A [r, k]`` factors)."""
    return {int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k}


def short_layer_name(module_path: str) -> str:
    """``base_model.model.blocks.3.attn.qkv`` -> ``blocks.3.attn.qkv``."""
    return module_path.removeprefix(PEFT_PREFIX)


# ----------------------------------------------------------------------------------- layers
def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, LoraModule]:
    """``{module path: peft LoraLayer}`` of the layers holding ``adapter``, in module order."""
    from peft.tuners.lora import LoraLayer  # imported already wherever a peft model exists

    return {
        name: cast(LoraModule, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def find_lora_parameters(
    model: torch.nn.Module, adapter_name: str = ADAPTER
) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``{layer: (A weight, B weight)}`` of a peft model's LoRA layers, in module order.

    Layer names are module paths, matching the prefixes of ``get_peft_model_state_dict`` keys.
    Raises :class:`~livar_merge.errors.GlobalStateError` for a layer with factor A of the
    adapter but no B, or whose factor weights are not parameters.
    """
    found: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for name, module in lora_layers(model, adapter_name).items():
        factors_a, factors_b = module.lora_A, module.lora_B
        if adapter_name not in factors_b:
            raise GlobalStateError(f"LoRA layer {name!r} has factor A of {adapter_name!r} but no B")
        weight_a, weight_b = factors_a[adapter_name].weight, factors_b[adapter_name].weight
        if not (
            isinstance(weight_a, torch.nn.Parameter) and isinstance(weight_b, torch.nn.Parameter)
        ):
            raise GlobalStateError(f"LoRA layer {name!r}: the factor weights are not parameters")
        found[name] = (weight_a, weight_b)
    return found


def base_weight(module: torch.nn.Module | LoraModule) -> torch.nn.Parameter:
    """The frozen weight ``[d, k]`` of a LoRA layer."""
    return module.get_parameter("base_layer.weight")


def base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{parameter name: frozen weight or bias}`` of the LoRA layers."""
    return {name: p for name, p in model.named_parameters() if is_base_parameter(name)}


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA factors as ``get_peft_model_state_dict`` names them, as detached copies."""
    return {
        lora_key(name): param.detach().clone()
        for name, param in model.named_parameters()
        if is_lora_parameter(name)
    }


def peft_scalings(model: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, float]:
    """``{layer: scaling}`` of a peft model's LoRA layers (``lora_alpha / r``, or rsLoRA's)."""
    return {
        name: float(module.scaling[adapter_name])
        for name, module in lora_layers(model, adapter_name).items()
        if adapter_name in module.scaling
    }


def timm_core(model: torch.nn.Module) -> torch.nn.Module:
    """The timm model inside a peft wrapper."""
    return model.get_submodule(PEFT_PREFIX.rstrip("."))


def head_module(model: torch.nn.Module) -> torch.nn.Linear:
    """The trainable head (peft's modules_to_save copy)."""
    head = timm_core(model).get_submodule(HEAD)
    if hasattr(head, "modules_to_save"):
        head = head.get_submodule(f"modules_to_save.{ADAPTER}")
    # a timm classifier's head is a Linear (check_lora_targets rejects a model whose is not)
    return cast(torch.nn.Linear, head)


def lora_config(
    *, rank: int, alpha: float, target_modules: str | list[str], dropout: float = 0.0
) -> Any:
    """The ``peft.LoraConfig`` livar builds: LoRA on ``target_modules``, the head trained."""
    import peft

    return peft.LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but only computes lora_alpha / r; livar's is a float
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=[HEAD],
    )


# ------------------------------------------------------------------------------ operations
@torch.no_grad()
def fold_into_base(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add dense deltas ``{layer: [d, k]}`` to the frozen weights of the LoRA layers."""
    modules = dict(model.named_modules())
    for layer, delta in deltas.items():
        weight = base_weight(modules[layer])
        weight.add_(delta.to(weight))


@torch.no_grad()
def restart_lora(model: torch.nn.Module, layers: Iterable[str], seed: int) -> None:
    """Re-initialise the LoRA of ``layers`` (B = 0, Kaiming-uniform A) from ``seed``."""
    torch.manual_seed(seed)
    modules = dict(model.named_modules())
    for layer in layers:
        cast(LoraModule, modules[layer]).reset_lora_parameters(ADAPTER, True)


@torch.no_grad()
def load_factors(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, seed: int) -> None:
    """Copy LoRA factors (keys without the adapter, ``<layer>.lora_A.weight``) into ``model``.

    A layer whose factors have fewer components than the model's rank (an ``svd`` merge of
    fewer components) is first restarted from ``seed`` (:func:`restart_lora`), so its missing
    ``B`` columns are 0 and its extra ``A`` rows Kaiming-uniform: the product is the merge.
    Raises :class:`GlobalStateError` for factors above the model's rank."""
    params = dict(model.named_parameters())
    named = {parameter_name(key): value for key, value in state.items()}
    for key, value in named.items():
        if value.numel() > params[key].numel():
            raise GlobalStateError(
                f"merged LoRA {key} has shape {tuple(value.shape)}, more than the global "
                f"model's {tuple(params[key].shape)} (a merge above its rank)"
            )
    short = sorted({layer_of(k) for k, v in named.items() if v.shape != params[k].shape})
    if short:
        restart_lora(model, short, seed)
    for key, value in named.items():
        target = params[key]
        if value.shape == target.shape:
            target.copy_(value.to(target.dtype))
        elif is_factor_b(key):
            target[:, : value.shape[1]] = value.to(target.dtype)
        else:
            target[: value.shape[0]] = value.to(target.dtype)


@contextlib.contextmanager
def frozen_weights(
    model: torch.nn.Module,
    *,
    replace: Mapping[str, torch.Tensor] | None = None,
    add: Mapping[str, torch.Tensor] | None = None,
    zero_lora: bool = False,
) -> Iterator[torch.nn.Module]:
    """Within the block, the frozen weight of each LoRA layer named in ``replace``/``add`` is
    ``replace[layer]`` (else itself) plus ``add[layer]``, and with ``zero_lora`` every LoRA B
    is 0 (the LoRA adds nothing); afterwards every weight is restored exactly. With neither,
    the frozen weights and factors are only saved and restored (for in-place merges)."""
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        name: (base_weight(module), module.get_parameter(f"lora_B.{ADAPTER}.weight"))
        for name, module in lora_layers(model).items()
    }
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for layer, (weight, factor_b) in layers.items():
            saved[layer] = (weight.detach().clone(), factor_b.detach().clone())
            if replace is not None and layer in replace:
                weight.copy_(replace[layer])
            if add is not None and layer in add:
                weight.add_(add[layer].to(weight))
            if zero_lora:
                factor_b.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, (weight, factor_b) in saved.items():
                layers[layer][0].copy_(weight)
                layers[layer][1].copy_(factor_b)


# ------------------------------------------------------------------------------- checksums
def base_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen weights of the LoRA layers (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, param in base_parameters(model).items():
        digest.update(f"base/{name}".encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def frozen_checksum(model: torch.nn.Module, lora_merge: str) -> str:
    """SHA-256 of the frozen parameters that are *not* part of the global state (in product
    mode the LoRA layers' frozen weights are). Server and clients compare it to catch another
    backbone (weights file, architecture, seed)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad or (lora_merge == "product" and is_base_parameter(name)):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------------- checks
def check_lora_targets(model: torch.nn.Module, adapter: str = ADAPTER) -> tuple[str, ...]:
    """Check that ``model`` is a peft LoRA model whose global state livar can carry; returns
    its LoRA layers. Raises :class:`GlobalStateError` naming what is wrong: no ``adapter``
    adapter or several adapters, no LoRA layer, a LoRA layer that is not a Linear (Eq. 3 merges
    ``B A`` into a ``[d, k]`` weight) or uses DoRA (its magnitude is not carried), frozen LoRA
    factors, or a head that is missing or not trainable."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or adapter not in peft_config:
        raise GlobalStateError(
            f"model is not a peft model with a LoRA adapter named {adapter!r} "
            "(build it with peft.get_peft_model(model, LoraConfig(...)))"
        )
    if len(peft_config) != 1:
        raise GlobalStateError(f"model has adapters {sorted(peft_config)}; expected one")
    layers = []
    for name, module in lora_layers(model, adapter).items():
        base = module.get_base_layer()
        if not isinstance(base, torch.nn.Linear):
            raise GlobalStateError(
                f"LoRA layer {name!r} wraps a {type(base).__name__}, not a Linear"
            )
        if module.use_dora.get(adapter, False):
            raise GlobalStateError(f"LoRA layer {name!r} uses DoRA, which is not supported")
        for factor in (module.lora_A[adapter].weight, module.lora_B[adapter].weight):
            if not factor.requires_grad:
                raise GlobalStateError(f"LoRA layer {name!r} has frozen factors")
        layers.append(name)
    if not layers:
        raise GlobalStateError(f"model has no LoRA layer of adapter {adapter!r}")
    try:
        head = head_module(model)
    except AttributeError as err:
        raise GlobalStateError(
            f"model has no classification head at {PEFT_PREFIX}{HEAD} (a timm model): {err}"
        ) from err
    if not isinstance(head, torch.nn.Linear) or not head.weight.requires_grad:
        raise GlobalStateError(
            "the head must be a trainable Linear (LoraConfig(modules_to_save=['head']))"
        )
    return tuple(layers)
