"""Install an aggregation result as the next global model: the one rule both engines use.

``product`` (Eq. 3 exactly): the merged ``sum_m alpha_m s B_m A_m`` of every layer is folded into
its frozen weight and the LoRA restarts (B = 0, Kaiming-uniform A from
``derive_seed(seed, round, "lora-restart")``). ``svd`` and ``factors``: the merged factors are
loaded and clients continue from them. The head is copied in every mode.
"""

from __future__ import annotations

import torch

from livar_merge.aggregation import AggregationResult
from livar_merge.federated.data import derive_seed
from livar_merge.federated.model import ADAPTER, fold_into_base, restart_lora, set_head
from livar_merge.lora import to_peft_state_dict


@torch.no_grad()
def install_result(
    model: torch.nn.Module,
    result: AggregationResult,
    *,
    lora_merge: str,
    seed: int,
    round_index: int,
) -> None:
    """Write ``result`` (merged LoRA and head) into the peft ``model`` in place."""
    set_head(model, result.head.weight, result.head.bias)
    if lora_merge == "product":
        fold_into_base(model, {k: d.to_dense() for k, d in result.lora.items()})
        restart_lora(model, list(result.lora), derive_seed(seed, round_index, "lora-restart"))
    else:
        params = dict(model.named_parameters())
        for key, value in to_peft_state_dict(result.lora, adapter_name=ADAPTER).items():
            params[key].copy_(value.to(params[key].dtype))
