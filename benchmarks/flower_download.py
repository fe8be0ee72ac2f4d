"""Flower download per node per round in ``product`` mode at ViT-B/16 shapes, before and after
the round updates (``livar_merge.flower.base_sync``).

The bytes are those of the messages ``LivarStrategy.model_contents`` builds for a real peft
ViT-B/16 (random init: the sizes do not depend on the values; 48 LoRA layers, r = 16, 100
classes) after one installed round whose merged update has the stacked rank K r of the K
clients that trained (K = M, or K sampled with ``--clients-per-round``):

* before: the full global model every round (frozen weights of the 48 LoRA layers, LoRA, head),
  which is what every node received before this change and what a node that holds nothing
  still receives once;
* after: LoRA, head and the round's update (per layer stacked factors or dense, the smaller);
  also a node that sat out a round (two rounds of updates);
* the LoRA size (what a client uploads, without statistics) for scale.

    python benchmarks/flower_download.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save

MB = 2**20


def main() -> None:
    import peft
    import timm
    import torch
    from flwr.app import ConfigRecord

    from livar_merge.federated.server import FederatedServer
    from livar_merge.flower.base_sync import BaseSync, record_bytes
    from livar_merge.flower.strategy import LivarStrategy
    from livar_merge.lora import LoraDelta

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    model = peft.get_peft_model(
        vit, peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, modules_to_save=["head"])
    )
    server = FederatedServer(model, seed=0, method="fedavg", lora_merge="product")
    strategy = LivarStrategy(server)
    layers = {
        name: module.base_layer.weight.shape
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }
    lora_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n
    )
    head_bytes = sum(
        p.numel() * p.element_size() for p in server.model.base_model.model.head.parameters()
    )
    rows = []
    for clients, sampled in ((10, 10), (100, 100), (100, 10)):
        rank = 16 * sampled

        def update(rank: int = rank) -> dict[str, LoraDelta]:
            return {
                name: LoraDelta(scaling=1.0, B=torch.zeros(d, rank), A=torch.zeros(rank, k))
                for name, (d, k) in layers.items()
            }

        server.last_install = None
        strategy.download.base = BaseSync(server)
        strategy.download.base._version, strategy.download.base._updates = (
            2,
            {1: update(), 2: update()},
        )
        strategy.download.refresh()
        strategy.download.base.node_versions = {1: 1, 2: 0}  # node 1 held version 1, node 2 sat out
        contents = strategy.download.contents([1, 2, 3], ConfigRecord({"server-round": 3}))
        before, after, missed = (record_bytes(contents[n]) for n in (3, 1, 2))
        rows.append(
            {
                "clients": clients,
                "sampled_per_round": sampled,
                "update_rank": rank,
                "before_MB": before / MB,
                "after_MB": after / MB,
                "after_sat_out_one_round_MB": missed / MB,
                "lora_MB": lora_bytes / MB,
                "lora_and_head_MB": (lora_bytes + head_bytes) / MB,
                "before_over_after": before / after,
                "after_over_lora": after / lora_bytes,
            }
        )
        print(rows[-1], flush=True)
    lines = [
        "# Flower download per node per round, product mode, ViT-B/16 shapes (48 LoRA layers, "
        "r = 16, 100 classes)",
        "",
        "| M | K per round | update rank | before (MB) | after (MB) | after, sat out a round (MB) "
        "| LoRA (MB) | before / after | after / LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['sampled_per_round']} | {r['update_rank']} | "
            f"{r['before_MB']:.1f} | {r['after_MB']:.1f} | {r['after_sat_out_one_round_MB']:.1f} "
            f"| {r['lora_MB']:.1f} | {r['before_over_after']:.2f} | {r['after_over_lora']:.2f} |"
        )
    lines += [
        "",
        "before: the full global model (what every node received each round before the round "
        "updates; still sent once to a node that holds nothing). after: LoRA + head + the "
        "round's merged update, per layer stacked factors (rank K r) or dense, the smaller. "
        "Bytes are the array payloads of the messages LivarStrategy.model_contents builds.",
    ]
    save("flower_download", {"machine": machine(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
