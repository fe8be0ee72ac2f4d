"""Install an aggregation result as the next global model: the one rule both engines use.

``product`` (Eq. 3 exactly): the merged ``sum_m alpha_m s B_m A_m`` of every layer is folded into
its frozen weight and the LoRA restarts (B = 0, Kaiming-uniform A from
``derive_seed(seed, round, "lora-restart")``). ``svd`` and ``factors``: the merged factors are
loaded and clients continue from them. The head is copied in every mode.

Mixed client ranks (``client_ranks``): a ``product`` merge of clients of ranks ``r_m`` has the
stacked rank ``sum_m r_m``; it is folded dense as always. An ``svd`` merge has the global
model's rank ``r`` unless the round's clients hold fewer components in all (``sum_m r_m < r``,
a few low-rank participants): the missing components are then padded, ``B`` columns 0 and
Kaiming-uniform ``A`` rows from ``derive_seed(seed, round, "lora-restart")``, so the product is
the merge and the full rank can train.
"""

from __future__ import annotations

import torch

from livar_merge.aggregation import AggregationResult
from livar_merge.federated.data import derive_seed
from livar_merge.federated.model import set_head
from livar_merge.lora import to_peft_state_dict
from livar_merge.lora_view import fold_into_base, load_factors, restart_lora


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
    else:  # svd of fewer components than the model's rank: padded (module docstring)
        state = to_peft_state_dict(result.lora)
        load_factors(model, state, seed=derive_seed(seed, round_index, "lora-restart"))
