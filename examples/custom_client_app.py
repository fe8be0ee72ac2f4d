"""Your own Flower ClientApp for ``LivarStrategy``: a plain timm + peft model and your own loop.

What a reply must carry (``livar_merge.flower.messages`` documents every key): the client's LoRA
factors and head after local training, its sample count, omega_A/omega_B per LoRA layer (an
:class:`~livar_merge.ImportanceTracker` attached to the optimizer), the per-class feature
variance sigma, presence and counts (:class:`~livar_merge.ClassFeatureStats` over the local
data after training), and the identity the strategy checks: the G_SHAP table the server named in
the train message (``table-name``/``-version``/``-checksum``, echoed back so that a client built
against another table version is dropped rather than silently mixed in) and the option hash
(``config-hash``, echoed from the message's run config; a strategy built with
``config_hash=None`` accepts any). :func:`~livar_merge.flower.pack_reply` builds the record from
a :class:`~livar_merge.ClientUpdate`, whose ``lora`` is exactly what
``peft.get_peft_model_state_dict`` returns for the LoRA layers.

Run it (Flower Simulation Engine, 3 clients, 2 rounds, a tiny random-init ViT on random data;
about a minute on a laptop)::

    python examples/custom_client_app.py
"""

from __future__ import annotations

import peft
import timm
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from livar_merge import ClassFeatureStats, ClientUpdate, ImportanceTracker, find_lora_parameters
from livar_merge.flower import (
    FederatedServer,
    LivarStrategy,
    from_array_record,
    load_global_tensors,
    pack_reply,
)

NUM_CLASSES, IMAGE, SAMPLES, ROUNDS, CLIENTS = 4, 16, 48, 2, 3
# a 2-block, width-32 ViT on IMAGE x IMAGE inputs (small enough for a CPU)
ARCHITECTURE = dict(
    img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES
)


def make_model() -> torch.nn.Module:
    """The same seeded peft LoRA ViT on the server and every client (LoRA on the block
    Linears, the head trained and sent as ``modules_to_save``)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCHITECTURE)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
        modules_to_save=["head"],
    )
    return peft.get_peft_model(vit, config)


def client_data(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Your data loading; here random images with a label skew per partition."""
    g = torch.Generator().manual_seed(partition)
    labels = (torch.arange(SAMPLES) % (NUM_CLASSES - 1) + partition) % NUM_CLASSES
    return torch.randn(SAMPLES, 3, IMAGE, IMAGE, generator=g), labels


def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    vit = model.base_model.model
    features = vit.forward_head(vit.forward_features(x), pre_logits=True)
    return features, vit.head(features)


def local_update(model: torch.nn.Module, partition: int, epochs: int = 1) -> ClientUpdate:
    """One client's round: AdamW on LoRA + head with omega tracked, then sigma^(c)."""
    x, y = client_data(partition)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    tracker = ImportanceTracker(model).attach(optimizer)  # omega_A, omega_B per LoRA matrix
    tracker.start_round()
    model.train()
    for _ in range(epochs):
        for batch in torch.arange(SAMPLES).split(16):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    tracker.detach()
    model.eval()
    stats = ClassFeatureStats(NUM_CLASSES)  # sigma^(c) over correctly classified samples
    with torch.no_grad():
        features, logits = features_and_logits(model, x)
        stats.update(features, y, logits)
    importance, classes = tracker.result(), stats.result()
    state = peft.get_peft_model_state_dict(model)  # '<layer>.lora_A.weight', ..., head
    head = model.base_model.model.head.modules_to_save["default"]
    return ClientUpdate(
        client_id=f"client_{partition}",
        num_samples=SAMPLES,
        lora={k: v.detach().clone() for k, v in state.items() if ".lora_" in k},
        head_weight=head.weight.detach().clone(),
        head_bias=head.bias.detach().clone(),
        layer_names=importance.layer_names,
        omega_a=importance.omega_a,
        omega_b=importance.omega_b,
        class_sigma=classes.sigma,
        class_present=classes.present,
        class_counts=classes.count,
        report={"train_loss": float(loss.detach())},  # sent as the reply's train-loss metric
    )


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    model = make_model()
    load_global_tensors(model, from_array_record(msg.content["arrays"]))  # LoRA, head, base
    update = local_update(model, partition)
    table = {key: config[f"table-{key}"] for key in ("name", "version", "checksum")}
    reply = pack_reply(
        update,
        partition_id=partition,
        table=table,
        config_hash=str(config.get("config-hash", "")),
    )
    return Message(reply, reply_to=msg)


def make_strategy() -> LivarStrategy:
    """The server side: LIVAR with the paper's Table A on the same seeded model."""
    model = make_model()
    assert len(find_lora_parameters(model)) == 8
    server = FederatedServer(model, seed=0, method="livar")  # the round: method, table, merge
    return LivarStrategy(server, min_available_nodes=CLIENTS)  # the transport


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = make_strategy()
    result = strategy.start(grid, initial_arrays=strategy.initial_arrays(), num_rounds=ROUNDS)
    accepted = [len(record.updates) for record in strategy.history]
    print(f"LIVAR: {len(accepted)} rounds, updates accepted per round {accepted}")
    print(
        "train loss per round:",
        {r: m["train-loss"] for r, m in result.train_metrics_clientapp.items()},
    )


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
