"""Product mode's download (livar_merge.flower.base_sync): round updates instead of the full
frozen weights for nodes that hold the previous ones, folded bit for bit as the server folds (on
other CPU code paths and thread counts too), the full weights within the same round for nodes
that lost them or whose fold differs, and for nodes that did not confirm or would need more than
the weights, and the bytes each node receives."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from flwr.app import ConfigRecord, Error, RecordDict  # noqa: E402

from livar_merge.errors import NodeConfigError  # noqa: E402
from livar_merge.federated.global_state import load_global_tensors  # noqa: E402
from livar_merge.federated.server import FederatedServer  # noqa: E402
from livar_merge.flower import base_sync  # noqa: E402
from livar_merge.flower.base_sync import (  # noqa: E402
    BASE_STATE,
    BASE_UPDATE,
    BaseResync,
    base_parameters,
    fold_updates,
    parse_update,
    resync_reply,
    sync_node_base,
    update_tensors,
    wire_delta,
)
from livar_merge.flower.messages import (  # noqa: E402
    ARRAYS,
    CONFIG,
    INFO,
    from_array_record,
    to_array_record,
)
from livar_merge.flower.strategy import FlowerSettings, LivarStrategy  # noqa: E402
from livar_merge.lora import LoraDelta  # noqa: E402
from livar_merge.lora_view import base_checksum  # noqa: E402
from tests.helpers import (  # noqa: E402
    NUM_CLASSES,
    VIT_S_WIDTHS,
    FakeGrid,
    tiny_peft_vit,
)
from tests.helpers import fake_flower_update as fake_update  # noqa: E402

NODES = [31, 7, 52]


def test_wire_delta_sends_the_smaller_form_and_folds_as_the_server():
    g = torch.Generator().manual_seed(0)
    low = LoraDelta(
        scaling=0.5, B=torch.randn(40, 3, generator=g), A=torch.randn(3, 30, generator=g)
    )
    high = LoraDelta(
        scaling=0.5, B=torch.randn(8, 6, generator=g), A=torch.randn(6, 8, generator=g)
    )
    dense = LoraDelta(scaling=1.0, dense=torch.randn(8, 8, generator=g))
    assert set(wire_delta(low)) == {"B", "A", "scaling"}  # 210 < 1200 values
    assert set(wire_delta(high)) == {"dense"}  # 96 >= 64 values
    assert set(wire_delta(dense)) == {"dense"}
    parsed = parse_update(update_tensors({3: {"l": low}, 4: {"l": high}}))
    assert sorted(parsed) == [3, 4]
    assert torch.equal(parsed[3]["l"].to_dense(), low.to_dense())  # bit for bit
    assert torch.equal(parsed[4]["l"].to_dense(), high.to_dense())


def test_parse_update_refuses_malformed_updates():
    with pytest.raises(NodeConfigError, match="not <round>/<layer>/<part>"):
        parse_update({"layer/B": torch.zeros(2, 1)})
    with pytest.raises(NodeConfigError, match=r"parts \['A', 'B'\]"):
        parse_update({"1/l/B": torch.zeros(2, 1), "1/l/A": torch.zeros(1, 2)})
    with pytest.raises(NodeConfigError, match="NaN/Inf"):
        parse_update({"1/l/dense": torch.tensor([[float("nan")]])})


def one_ulp_off_fold(model, updates):
    """``fold_updates`` on a machine whose arithmetic differs from the server's by one ulp in
    one weight (the first LoRA layer's first entry moved towards +inf)."""
    fold_updates(model, updates)
    weight = next(iter(base_parameters(model).values()))
    with torch.no_grad():
        flat = weight.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))


class Node:
    """A simulated node: its own model copy and context.state, answering as our ClientApp
    (``perturbed``: its fold is one ulp off the server's)."""

    def __init__(
        self, model, client: str, seed: int, confirms: bool = True, perturbed: bool = False
    ) -> None:
        self.model, self.client, self.seed, self.confirms = model, client, seed, confirms
        self.perturbed = perturbed
        self.state = RecordDict()
        self.received: list[RecordDict] = []

    def answer(self, content: RecordDict):
        self.received.append(content)
        config = content[CONFIG]
        load_global_tensors(self.model, from_array_record(content[ARRAYS]))
        fold = one_ulp_off_fold if self.perturbed else fold_updates
        try:
            with mock.patch.object(base_sync, "fold_updates", fold):
                info = sync_node_base(self.model, content, config, self.state)
        except BaseResync as err:  # as the ClientApp's entry points answer
            return resync_reply(err)
        except NodeConfigError as err:
            return Error(code=1, reason=str(err))
        from tests.helpers import packed

        reply = packed(
            fake_update(self.model, self.client, self.seed + int(config["server-round"]))
        )
        if self.confirms:
            for key, value in (info or {}).items():
                reply[INFO][key] = value
        return reply


def federation(confirms=(True, True, True), perturbed=(), **widths):
    model = tiny_peft_vit(rank=4, alpha=4.0, num_classes=NUM_CLASSES, seed=0, **widths)
    nodes = {
        n: Node(copy.deepcopy(model), f"client_{m}", 10 * m, confirms[m], n in perturbed)
        for m, n in enumerate(NODES)
    }
    server = FederatedServer(model, seed=42, method="livar", lora_merge="product")
    strategy = LivarStrategy(server, settings=FlowerSettings(min_replies=1))
    grid = FakeGrid(NODES, lambda node, message: nodes[node].answer(message.content))
    return strategy, nodes, grid


def run_round(strategy, grid, r, nodes_subset=None):
    if nodes_subset is not None:
        grid.nodes = nodes_subset
    config = ConfigRecord({"server-round": r})
    arrays = (
        strategy.download.current
        if strategy.download.current is not None
        else strategy.initial_arrays()
    )
    messages = list(strategy.configure_train(r, arrays, config, grid))
    replies = grid.send_and_receive(messages)
    strategy.aggregate_train(r, replies)
    return messages


def test_nodes_receive_round_updates_and_hold_the_servers_weights_bit_for_bit():
    strategy, nodes, grid = federation()
    full_bytes = None
    for r in (1, 2, 3):
        messages = run_round(strategy, grid, r)
        for message in messages:
            content = message.content
            has_base = any(k.startswith("base/") for k in content[ARRAYS])
            assert has_base == (r == 1), (r, message.metadata.dst_node_id)
            assert (BASE_UPDATE in content) == (r > 1)
        rows = {o["node_id"]: o for o in strategy.history[-1].outcomes}
        if r == 1:
            full_bytes = rows[NODES[0]]["download_bytes"]
        else:
            assert all(row["download_bytes"] < full_bytes for row in rows.values())
    # each node trained round 3 on version 2 (two installs); folding the third install, as
    # the server did, gives the server's weights bit for bit
    expected = base_parameters(strategy.server.model)
    for node in nodes.values():
        fold_updates(node.model, {3: strategy.download.base.updates[3]})
        got = base_parameters(node.model)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert strategy.download.base.node_versions == dict.fromkeys(
        NODES, 2
    )  # confirmed with round 3's reply


ROOT = Path(__file__).resolve().parents[3]

# The node's side in its own Python process: the message and the node's kept state arrive as
# Flower's wire bytes (protobuf RecordDict), its model is built from the run's seed as a node
# builds it, it syncs its frozen weights with its own arithmetic (one torch thread, not the
# server's) and writes back what it ends with.
NODE_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from safetensors.torch import save_file
    from livar_merge.errors import NodeConfigError
    from livar_merge.federated.global_state import load_global_tensors
    from livar_merge.flower.base_sync import base_parameters, sync_node_base
    from livar_merge.flower.messages import ARRAYS, CONFIG, from_array_record
    from tests.helpers import NUM_CLASSES, tiny_peft_vit

    def read(path):
        return recorddict_from_proto(ProtoRecordDict.FromString(open(path, "rb").read()))

    results = {}
    for job in json.loads(sys.argv[1]):
        content, state = read(job["content"]), read(job["state"])
        model = tiny_peft_vit(rank=4, alpha=4.0, num_classes=NUM_CLASSES, seed=0)
        load_global_tensors(model, from_array_record(content[ARRAYS]))
        try:
            info, error = sync_node_base(model, content, content[CONFIG], state), None
        except NodeConfigError as err:
            info, error = None, str(err)
        weights = {k: v.detach().contiguous() for k, v in base_parameters(model).items()}
        save_file(weights, job["weights"])
        results[job["name"]] = {"info": info, "error": error, "state": sorted(state.keys())}
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def wire_bytes(record: RecordDict) -> bytes:
    """``record`` as Flower sends it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(record).SerializeToString()


def sha256_of(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of names and bytes computed here, not by base_sync's checksum."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_a_node_in_its_own_process_folds_the_update_to_the_servers_weights(tmp_path):
    """The download of round updates across a process boundary: a node in a separate Python
    process, given the message and its kept weights as wire bytes, folds the update with its
    own arithmetic and ends with the server's frozen weights (SHA-256 equal, bit for bit); the
    same node holding weights one ulp off before the fold refuses them (checksum) and forgets
    its state."""
    from safetensors.torch import load_file

    strategy, nodes, grid = federation()
    run_round(strategy, grid, 1)
    run_round(strategy, grid, 2)
    node = nodes[31]
    assert int(str(node.state["livar-base-info"]["version"])) == 1  # holds version 1
    content = strategy.download.contents([31], ConfigRecord({"server-round": 3}))[31]
    config = content[CONFIG]
    assert int(config["base-from"]) == 1 and int(config["base-to"]) == 2
    update = from_array_record(content[BASE_UPDATE])
    # the node multiplies the factors itself: its own arithmetic, not a dense copy
    assert any(k.endswith("/B") for k in update) and any(k.endswith("/A") for k in update)
    server = {k: v.detach().clone() for k, v in base_parameters(strategy.server.model).items()}
    kept = from_array_record(node.state[BASE_STATE])
    assert sha256_of(kept) != sha256_of(server)  # the update changes the weights

    # the node's kept weights with one value one ulp away, where the fold keeps the ulp: a
    # value the update shrinks (a one-ulp nudge of a value the update outgrows can round away)
    key = next(k for k in sorted(kept) if k.endswith(".base_layer.weight"))
    layer = key.removeprefix("base/").removesuffix(".base_layer.weight")
    step = strategy.download.base.updates[2][layer].to_dense().to(kept[key])
    shrinks = (server[key].abs() < kept[key].abs() / 2) & (server[key].sign() == kept[key].sign())
    index = int(torch.where(shrinks.view(-1), kept[key].abs().view(-1), 0.0).argmax())
    nudged = {k: v.clone() for k, v in kept.items()}
    flat = nudged[key].view(-1)
    flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf")))
    assert not torch.equal(nudged[key], kept[key])
    assert not torch.equal(nudged[key] + step, server[key])  # the precondition: it must refuse
    off_by_one_ulp = RecordDict(dict(node.state.items()))
    off_by_one_ulp[BASE_STATE] = to_array_record(nudged)

    jobs = []
    for name, state in (("held", node.state), ("one-ulp", off_by_one_ulp)):
        (tmp_path / f"{name}.content").write_bytes(wire_bytes(content))
        (tmp_path / f"{name}.state").write_bytes(wire_bytes(state))
        jobs.append(
            {
                "name": name,
                "content": str(tmp_path / f"{name}.content"),
                "state": str(tmp_path / f"{name}.state"),
                "weights": str(tmp_path / f"{name}.safetensors"),
            }
        )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", NODE_PROCESS, json.dumps(jobs), str(tmp_path / "out.json")],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    results = json.loads((tmp_path / "out.json").read_text())

    held = results["held"]
    assert held["error"] is None, held["error"]
    folded = load_file(str(tmp_path / "held.safetensors"))
    assert folded.keys() == server.keys()
    assert sha256_of(folded) == sha256_of(server)  # bit for bit, by a hash of our own
    assert all(torch.equal(folded[k], server[k]) for k in server)
    assert held["info"] == {"base-version": 2, "base-checksum": config["base-checksum"]}
    assert config["base-checksum"] == base_checksum(strategy.server.model)

    refused = results["one-ulp"]
    assert refused["info"] is None
    assert refused["error"] is not None and "differ from the server's" in refused["error"]
    assert refused["state"] == []  # forgotten: the server sends the full weights next time
    nudged_fold = load_file(str(tmp_path / "one-ulp.safetensors"))
    assert sha256_of(nudged_fold) != sha256_of(server)


def sent_in_round(grid, r) -> list[tuple[int, bool]]:
    """``(node, carries the full frozen weights)`` of each message of round ``r``, sorted."""
    return sorted(
        (m.metadata.dst_node_id, any(k.startswith("base/") for k in m.content[ARRAYS]))
        for m in grid.sent
        if m.metadata.group_id == str(r)
    )


def test_a_node_that_lost_its_weights_is_sent_them_in_full_within_the_round():
    strategy, nodes, grid = federation()
    run_round(strategy, grid, 1)
    nodes[7].state = RecordDict()  # the node restarted and lost its state
    run_round(strategy, grid, 2)
    rows = {o["node_id"]: o for o in strategy.history[-1].outcomes}
    assert all(o["accepted"] for o in rows.values())  # no reply lost
    assert "holds none" in rows[7]["base_resync"]
    assert rows[31]["base_resync"] == rows[52]["base_resync"] == ""
    assert sent_in_round(grid, 2) == [(7, False), (7, True), (31, False), (52, False)]
    assert rows[7]["download_bytes"] > rows[31]["download_bytes"]  # light + full
    assert strategy.download.base.full_only == {}  # it can fold: light again next round
    run_round(strategy, grid, 3)
    assert sent_in_round(grid, 3) == [(7, False), (31, False), (52, False)]
    assert all(o["accepted"] for o in strategy.history[-1].outcomes)


@pytest.mark.parametrize("widths", [{}, VIT_S_WIDTHS], ids=["tiny", "vit-s-widths"])
def test_a_node_whose_fold_is_one_ulp_off_trains_every_round_on_the_full_weights(widths):
    """A node whose arithmetic differs from the server's is recovered within the round it is
    found (the full weights, then its training reply) and sent the full weights from then on;
    the other nodes keep the light download and no reply is lost."""
    strategy, nodes, grid = federation(perturbed=(52,), **widths)
    light, full = {}, {}
    for r in (1, 2, 3, 4):
        run_round(strategy, grid, r)
        rows = {o["node_id"]: o for o in strategy.history[-1].outcomes}
        assert all(o["accepted"] for o in rows.values()), rows
        assert len(strategy.history[-1].updates) == 3
        light[r], full[r] = rows[31]["download_bytes"], rows[52]["download_bytes"]
        if r == 2:
            assert "differ from the server's" in rows[52]["base_resync"]
            assert sent_in_round(grid, 2) == [(7, False), (31, False), (52, False), (52, True)]
        else:
            assert rows[52]["base_resync"] == ""
    assert sent_in_round(grid, 3) == [(7, False), (31, False), (52, True)]
    assert full[1] == full[3] == full[4] == light[1]  # the full model
    assert light[2] < full[1] and full[2] == light[2] + full[1]  # light, then full
    assert "differ from the server's" in strategy.download.base.full_only[52]
    # node 52 trained round 4 on the server's version 3 (the full weights it was sent)
    assert (
        nodes[52].state["livar-base-info"]["checksum"]
        == nodes[31].state["livar-base-info"]["checksum"]
    )


def node_7_replies(nodes, reply: RecordDict):
    """A FakeGrid responder: node 7 always sends ``reply``, the others answer as our ClientApp."""
    return lambda node, message: reply if node == 7 else nodes[node].answer(message.content)


def test_a_node_that_asks_again_after_the_full_weights_is_dropped_with_the_reason():
    strategy, nodes, grid = federation()
    run_round(strategy, grid, 1)
    asks = resync_reply(BaseResync("its weights never match", cannot_fold=True))
    grid.respond = node_7_replies(nodes, asks)
    run_round(strategy, grid, 2)
    rows = {o["node_id"]: o for o in strategy.history[-1].outcomes}
    assert not rows[7]["accepted"] and rows[31]["accepted"] and rows[52]["accepted"]
    assert "asks for the full frozen weights again" in rows[7]["reason"]
    assert "never match" in rows[7]["reason"]


def test_a_node_that_does_not_confirm_always_receives_the_full_weights():
    strategy, _nodes, grid = federation(confirms=(True, False, True))
    for r in (1, 2):
        messages = {m.metadata.dst_node_id: m.content for m in run_round(strategy, grid, r)}
    assert any(k.startswith("base/") for k in messages[7][ARRAYS])
    assert BASE_UPDATE in messages[31]


def test_a_node_that_sat_out_receives_the_updates_it_missed_or_the_weights():
    strategy, _nodes, grid = federation()
    run_round(strategy, grid, 1)  # every node confirms version 0
    run_round(strategy, grid, 2, nodes_subset=[31, 52])  # node 7 sits out round 2
    grid.nodes = NODES
    messages = {m.metadata.dst_node_id: m.content for m in run_round(strategy, grid, 3)}
    assert int(messages[31][CONFIG]["base-from"]) == 1  # held version 1: one update
    assert {k.split("/")[0] for k in messages[31][BASE_UPDATE]} == {"2"}
    missed = from_array_record(messages[7][BASE_UPDATE])
    missed_bytes = sum(t.numel() * t.element_size() for t in missed.values())
    base = sum(
        p.numel() * p.element_size() for p in base_parameters(strategy.server.model).values()
    )
    # the two missed updates are smaller than the weights here (the other case, updates larger
    # than the weights: test_updates_larger_than_the_weights_are_replaced_by_the_weights)
    assert missed_bytes < base, (missed_bytes, base)
    assert int(messages[7][CONFIG]["base-from"]) == 0  # versions 1 and 2, folded in order
    assert {k.split("/")[0] for k in messages[7][BASE_UPDATE]} == {"1", "2"}
    assert not any(k.startswith("base/") for k in messages[7][ARRAYS])
    assert all(o["accepted"] for o in strategy.history[-1].outcomes)
    # every node confirmed version 2 with round 3: only version 3's update is kept
    assert sorted(strategy.download.base.updates) == [3]
    assert [len(r.updates) for r in strategy.history] == [0, 0, 3]  # earlier ones released


def test_updates_larger_than_the_weights_are_replaced_by_the_weights():
    strategy, _nodes, grid = federation()
    run_round(strategy, grid, 1)
    strategy.download.base.node_versions[7] = 0
    # pretend node 7 holds version 0 while the server is at version 1 + many more rounds
    updates = strategy.download.base.updates  # registers round 1's install as version 1
    for extra in range(2, 12):
        strategy.download.base._updates[extra] = updates[1]
    strategy.download.base._version = 11
    content = strategy.download.contents([7], ConfigRecord({"server-round": 12}))[7]
    assert BASE_UPDATE not in content and "base-from" not in content[CONFIG]
    assert any(k.startswith("base/") for k in content[ARRAYS])


def test_a_node_refuses_weights_that_differ_from_the_servers():
    strategy, nodes, grid = federation()
    run_round(strategy, grid, 1)
    node = nodes[31]
    content = strategy.download.contents([31], ConfigRecord({"server-round": 2}))[31]
    tampered = RecordDict({ARRAYS: content[ARRAYS], CONFIG: content[CONFIG]})
    tampered[BASE_UPDATE] = content[BASE_UPDATE]
    key = next(iter(tampered[BASE_UPDATE]))
    from livar_merge.flower.messages import to_array_record

    tensors = from_array_record(tampered[BASE_UPDATE])
    tensors[key] = tensors[key] + 1e-3
    tampered[BASE_UPDATE] = to_array_record(tensors)
    load_global_tensors(node.model, from_array_record(tampered[ARRAYS]))
    with pytest.raises(BaseResync, match="differ from the server's"):
        sync_node_base(node.model, tampered, tampered[CONFIG], node.state)
    assert len(node.state) == 0  # forgotten: the server sends the full weights next time
    assert base_checksum(strategy.server.model) == content[CONFIG]["base-checksum"]


# A node on another machine, emulated in its own process: the environment picks another CPU
# code path (MKL_CBWR, ATEN_CPU_CAPABILITY) or thread count. It folds the message's round
# update with the toolkit's fold and, for comparison, with a BLAS product (W + s * (B @ A)).
OTHER_MACHINE = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from livar_merge.federated.global_state import load_global_tensors
    from livar_merge.flower.base_sync import (
        BASE_STATE, BASE_UPDATE, base_parameters, parse_update, sync_node_base,
    )
    from livar_merge.flower.messages import ARRAYS, CONFIG, from_array_record
    from tests.helpers import NUM_CLASSES, VIT_S_WIDTHS, tiny_peft_vit

    def read(path):
        return recorddict_from_proto(ProtoRecordDict.FromString(open(path, "rb").read()))

    def digest(tensors):
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode()); h.update(tensors[key].detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    torch.set_num_threads(int(sys.argv[4]))
    content, state = read(sys.argv[1]), read(sys.argv[2])
    kept = from_array_record(state[BASE_STATE])
    blas = {}
    for layers in parse_update(from_array_record(content[BASE_UPDATE])).values():
        for layer, d in layers.items():
            key = f"base/{layer}.base_layer.weight"
            blas[key] = kept[key] + d.scaling * (d.B @ d.A)
    model = tiny_peft_vit(rank=8, alpha=8.0, num_classes=NUM_CLASSES, seed=0, **VIT_S_WIDTHS)
    load_global_tensors(model, from_array_record(content[ARRAYS]))
    info = sync_node_base(model, content, content[CONFIG], state)
    json.dump({"threads": torch.get_num_threads(),
               "capability": torch.backends.cpu.get_cpu_capability(),
               "fold": digest(base_parameters(model)), "blas": digest(blas),
               "checksum": info["base-checksum"]}, open(sys.argv[3], "w"))
    """
)

OTHER_MACHINES = {  # name: (environment, torch threads); the server uses 2 threads
    "1-thread": ({}, 1),
    "mkl-compatible-3-threads": ({"MKL_CBWR": "COMPATIBLE"}, 3),
    "no-simd-kernels-4-threads": ({"ATEN_CPU_CAPABILITY": "default"}, 4),
}


def test_nodes_on_other_cpu_code_paths_and_thread_counts_fold_vit_s_updates_bit_for_bit(
    tmp_path,
):
    """ViT-S block widths (qkv 1152 x 384, fc1 1536 x 384), three clients of rank 8 (stacked
    rank 24): a node in its own process on another CPU code path or thread count folds the
    round update to the server's frozen weights bit for bit, where a BLAS product of the same
    factors gives other bits on at least one of them (the arithmetic this replaced)."""
    torch.set_num_threads(2)
    model = tiny_peft_vit(rank=8, alpha=8.0, num_classes=NUM_CLASSES, seed=0, **VIT_S_WIDTHS)
    nodes = {n: Node(copy.deepcopy(model), f"client_{m}", 10 * m) for m, n in enumerate(NODES)}
    server = FederatedServer(model, seed=42, method="livar", lora_merge="product")
    strategy = LivarStrategy(server, settings=FlowerSettings(min_replies=1))
    grid = FakeGrid(NODES, lambda node, message: nodes[node].answer(message.content))
    run_round(strategy, grid, 1)
    run_round(strategy, grid, 2)
    content = strategy.download.contents([31], ConfigRecord({"server-round": 3}))[31]
    update = from_array_record(content[BASE_UPDATE])
    assert tuple(update["2/base_model.model.blocks.0.attn.qkv/B"].shape) == (1152, 24)
    server_weights = {k: v.detach() for k, v in base_parameters(strategy.server.model).items()}
    kept = from_array_record(nodes[31].state[BASE_STATE])
    server_blas = {
        f"base/{layer}.base_layer.weight": kept[f"base/{layer}.base_layer.weight"]
        + d.scaling * (d.B @ d.A)
        for layer, d in parse_update(update)[2].items()
    }
    (tmp_path / "content").write_bytes(wire_bytes(content))
    (tmp_path / "state").write_bytes(wire_bytes(nodes[31].state))
    results = {}
    for name, (env, threads) in OTHER_MACHINES.items():
        out = tmp_path / f"{name}.json"
        subprocess.run(
            [sys.executable, "-c", OTHER_MACHINE, str(tmp_path / "content"),
             str(tmp_path / "state"), str(out), str(threads)],
            check=True, cwd=ROOT, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        )  # fmt: skip
        results[name] = json.loads(out.read_text())
    assert results["1-thread"]["threads"] == 1
    assert results["mkl-compatible-3-threads"]["threads"] == 3
    assert results["no-simd-kernels-4-threads"]["threads"] == 4
    assert results["no-simd-kernels-4-threads"]["capability"] == "DEFAULT"
    expected = sha256_of(server_weights)
    for name, got in results.items():
        assert got["fold"] == expected, name  # bit for bit
        assert got["checksum"] == content[CONFIG]["base-checksum"], name
    blas_differs = [n for n, got in results.items() if got["blas"] != sha256_of(server_blas)]
    assert blas_differs, "no emulated machine changed the BLAS bits: the test would not bite"


def test_wire_bytes_counts_what_update_tensors_sends():
    g = torch.Generator().manual_seed(1)
    deltas = {
        "low": LoraDelta(0.5, B=torch.randn(40, 3, generator=g), A=torch.randn(3, 30, generator=g)),
        "high": LoraDelta(0.5, B=torch.randn(8, 6, generator=g), A=torch.randn(6, 8, generator=g)),
        "dense": LoraDelta(1.0, dense=torch.randn(8, 8, generator=g)),
    }
    sent = update_tensors({1: deltas})
    assert base_sync.wire_bytes(deltas) == sum(t.numel() * t.element_size() for t in sent.values())


def test_a_malformed_full_weights_request_is_dropped_not_fatal():
    strategy, nodes, grid = federation()
    run_round(strategy, grid, 1)

    malformed = RecordDict({INFO: ConfigRecord({"base-resync": "please", "reason": "x"})})
    grid.respond = node_7_replies(nodes, malformed)
    run_round(strategy, grid, 2)
    rows = {o["node_id"]: o for o in strategy.history[-1].outcomes}
    assert not rows[7]["accepted"] and "unknown kind 'please'" in rows[7]["reason"]
    assert rows[31]["accepted"] and rows[52]["accepted"]
