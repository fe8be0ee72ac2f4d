"""The LoRA view of a peft model (livar_merge.lora_view): the one home of peft's names.

A peft key literal (a factor key such as ``.lora_A.``, ``base_layer``, ``modules_to_save``,
``base_model.model``) anywhere else in the package fails the first test; the others check the
view against peft itself and against independent computations.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from livar_merge.errors import GlobalStateError
from livar_merge.lora_view import (
    base_checksum,
    factor_key,
    find_lora_parameters,
    fold_into_base,
    frozen_weights,
    head_module,
    layer_of,
    load_factors,
    lora_layers,
    lora_state,
    parameter_name,
    parse_factor_key,
    peft_scalings,
)
from tests.helpers import REPO, tiny_peft_vit

PEFT_LITERAL = re.compile(r"(^|\.)lora_[AB](\.|$)|base_layer|modules_to_save|base_model\.model")
SOURCES = [
    p
    for package in ("livar_merge", "livar_calib", "analysis")
    for p in sorted((REPO / package).rglob("*.py"))
    if p.name != "lora_view.py"
]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def peft_literals(path: Path) -> list[str]:
    """``path:line: literal`` of every string constant (f-string parts included, docstrings
    and comments not) that spells a peft key."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        text = node.value if isinstance(node, ast.Constant) else None
        if isinstance(text, str) and id(node) not in docs and PEFT_LITERAL.search(text):
            hits.append(f"{path.name}:{node.lineno}: {text!r}")
    return hits


def test_no_peft_key_literal_outside_the_lora_view():
    assert len(SOURCES) > 50
    hits = [f"{path.parent.name}/{hit}" for path in SOURCES for hit in peft_literals(path)]
    assert hits == []


def test_the_literal_scan_sees_what_it_must(tmp_path):
    """The scan is not vacuous: it flags keys in strings and f-strings, not docstrings or
    prose in messages."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstring: <layer>.lora_A.weight is fine here."""\n'
        'A = f"{layer}.lora_A.weight"\n'
        'B = getattr(module, "base_layer")\n'
        'C = "lora_B"\n'
        'D = f"{who}: lora_B has shape {shape}"  # prose in a message\n'
    )
    lines = sorted(int(hit.split(":")[1]) for hit in peft_literals(sample))
    assert lines == [2, 3, 4]


@pytest.fixture(scope="module")
def model():
    return tiny_peft_vit(num_classes=5, rank=4)


def test_keys_round_trip_and_match_peft(model):
    from peft import get_peft_model_state_dict

    peft_keys = [k for k in get_peft_model_state_dict(model) if ".lora_" in k]
    ours = lora_state(model)
    assert sorted(ours) == sorted(peft_keys)  # peft's own state-dict names
    for key in ours:
        layer, which, adapter = parse_factor_key(key)
        assert adapter is None and factor_key(layer, which) == key and layer_of(key) == layer
        named = parameter_name(key)
        assert parse_factor_key(named) == (layer, which, "default")
        assert named in dict(model.named_parameters())
    assert parse_factor_key("head.weight") is None


def test_layers_are_found_by_type_not_by_attribute(model):
    from peft.tuners.lora import LoraLayer

    expected = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert list(lora_layers(model)) == expected and len(expected) >= 8
    assert list(find_lora_parameters(model)) == expected

    class Impostor(torch.nn.Module):  # has the attributes but is no peft layer
        def __init__(self) -> None:
            super().__init__()
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 2)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 3)})

    assert lora_layers(torch.nn.Sequential(Impostor())) == {}
    scalings = peft_scalings(model)
    assert set(scalings) == set(expected)
    for layer, module in lora_layers(model).items():
        assert scalings[layer] == pytest.approx(module.scaling["default"])


def test_fold_and_frozen_weights_restore_exactly(model):
    layers = list(lora_layers(model))
    params = dict(model.named_parameters())
    weight = params[f"{layers[0]}.base_layer.weight"]
    before = weight.detach().clone()
    checksum = base_checksum(model)
    delta = torch.randn_like(weight)
    with frozen_weights(model, add={layers[0]: delta}, zero_lora=True):
        torch.testing.assert_close(weight, before + delta)
        assert base_checksum(model) != checksum
    assert torch.equal(weight, before) and base_checksum(model) == checksum
    fold_into_base(model, {layers[0]: delta})
    torch.testing.assert_close(weight, before + delta)
    with torch.no_grad():
        weight.copy_(before)


def test_load_factors_pads_a_lower_rank_and_refuses_a_higher(model):
    layer = next(iter(lora_layers(model)))
    params = dict(model.named_parameters())
    a_param = params[parameter_name(factor_key(layer, "A"))]
    b_param = params[parameter_name(factor_key(layer, "B"))]
    r, k = a_param.shape
    d = b_param.shape[0]
    low_a, low_b = torch.randn(2, k), torch.randn(d, 2)
    load_factors(model, {factor_key(layer, "A"): low_a, factor_key(layer, "B"): low_b}, seed=3)
    # the product is the merge: padded B columns are 0 (a brute-force product check)
    torch.testing.assert_close(b_param @ a_param, low_b @ low_a)
    assert torch.equal(a_param[:2], low_a) and bool((a_param[2:] != 0).any())
    with pytest.raises(GlobalStateError, match="more than the global model's"):
        load_factors(model, {factor_key(layer, "A"): torch.randn(r + 1, k)}, seed=3)


def test_head_module_is_the_trained_copy(model):
    head = head_module(model)
    assert isinstance(head, torch.nn.Linear) and head.weight.requires_grad
