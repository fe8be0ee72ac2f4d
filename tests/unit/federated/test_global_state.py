"""The global state of a LoRA model (federated.global_state) and the target checks."""

from __future__ import annotations

import copy

import pytest
import torch

from livar_merge.federated.global_state import GlobalStateError, global_tensors, load_global_tensors
from livar_merge.lora_view import (
    check_lora_targets,
    find_lora_parameters,
    lora_key,
    lora_state,
    parameter_name,
)
from tests.helpers import tiny_peft_vit, tiny_vit


# ------------------------------------------------------------------------ peft key names
def test_key_conventions_match_peft(model):
    import peft

    reference = peft.get_peft_model_state_dict(model)
    mine = lora_state(model)
    assert set(mine) == {k for k in reference if ".lora_" in k}
    for key, value in mine.items():
        torch.testing.assert_close(value, reference[key])
        assert lora_key(parameter_name(key)) == key
        assert parameter_name(key) in dict(model.named_parameters())


def test_load_global_tensors_names_the_bad_key(model):
    tensors = global_tensors(model, "product")
    with pytest.raises(GlobalStateError, match="'lora/nope.lora_A.weight' names no parameter"):
        load_global_tensors(model, {"lora/nope.lora_A.weight": torch.zeros(1)})
    key = "head/weight"
    with pytest.raises(GlobalStateError, match="'head/weight' has shape"):
        load_global_tensors(model, {key: torch.zeros(tensors[key].shape[0] + 1, 3)})


def test_check_lora_targets_before_any_round():
    import peft

    good = tiny_peft_vit()
    assert check_lora_targets(good) == tuple(find_lora_parameters(good))
    plain = tiny_vit(num_classes=3)
    with pytest.raises(GlobalStateError, match="not a peft model"):
        check_lora_targets(plain)
    no_head = peft.get_peft_model(
        copy.deepcopy(plain), peft.LoraConfig(r=2, target_modules=["qkv"])
    )
    with pytest.raises(GlobalStateError, match="trainable Linear"):
        check_lora_targets(no_head)
    dora = peft.get_peft_model(
        copy.deepcopy(plain),
        peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True, modules_to_save=["head"]),
    )
    with pytest.raises(GlobalStateError, match="DoRA"):
        check_lora_targets(dora)
