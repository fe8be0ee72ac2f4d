"""livar-export end to end: tiny ``product`` and ``svd`` runs exported to both formats, each
loaded in a fresh Python process that imports only torch, timm, peft and safetensors, its
logits on the run's test images compared with the run's final global model (rebuilt with
livar's own builder and checkpoint reader) and its top-1 with ``metrics.csv``.

Tolerances: the timm export and every exact peft export (svd run: factors as trained, or
re-factorised at ``--rank 8``; product run at its default rank, the largest numerical rank of a
layer's update, and at ``--rank 32``, the full rank of the tiny ViT's layers) reproduce the
logits to max abs difference < 1e-4 and the test accuracy exactly; the product run at
``--rank 4`` is lossy, its per-layer errors are recomputed here from the checkpoint and W0
with numpy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from livar_merge.apps.export import ExportOptions, export_run, main
from livar_merge.apps.export.peft_writer import BASE_FILE
from livar_merge.apps.export.source import REPORT_FILE
from livar_merge.engines.inprocess import run_federated
from livar_merge.federated.federation import build_federation
from livar_merge.federated.run_folder import RunFolder
from tests.helpers import tiny

TOLERANCE = 1e-4

# the user's side: nothing of livar, only the ecosystem
LOADER = textwrap.dedent(
    """
    import json, sys
    import torch, timm, peft
    from safetensors.torch import load_file, save_file

    jobs = json.loads(sys.argv[1])
    outputs = {}
    for job in jobs:
        data = load_file(job["inputs"])
        meta = json.load(open(job["meta"]))
        model = timm.create_model(meta["model"], pretrained=False,
                                  num_classes=meta["num_classes"], **meta["create_kwargs"])
        if job["format"] == "timm":
            model.load_state_dict(load_file(job["path"]), strict=True)
        else:
            base = job.get("base") or job["path"] + "/base_model.safetensors"
            model.load_state_dict(load_file(base), strict=True)
            model = peft.PeftModel.from_pretrained(model, job["path"])
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x) for x in data["x"].split(64)])
        outputs[job["name"]] = logits.contiguous()
        correct = int((logits.argmax(1) == data["y"]).sum())
        outputs[job["name"] + "/accuracy"] = torch.tensor(correct / len(data["y"]),
                                                         dtype=torch.float64)
    assert not any(name.startswith("livar") for name in sys.modules), "livar was imported"
    save_file(outputs, sys.argv[2])
    """
)


def independent_w0(config) -> dict[str, torch.Tensor]:
    """W0 built here from the run's recorded weights source (a seeded random initialisation:
    the seed of livar's model-init rule) with timm alone, not by livar's builder or export."""
    import timm

    from livar_merge.federated.data import derive_seed

    torch.manual_seed(derive_seed(config.seed, "model-init"))
    model = timm.create_model(
        config.model,
        pretrained=False,
        num_classes=10,
        img_size=config.image_size,
        **config.architecture_overrides(),
    )
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def perturbed(w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W0 with the frozen weights of every LoRA layer moved by 5 % of their scale: another base
    under the same adapter (a wrong W0)."""
    gen = torch.Generator().manual_seed(7)
    out = dict(w0)
    for key, value in w0.items():
        if key.startswith("blocks.") and key.endswith(
            ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")
        ):
            noise = torch.randn(value.shape, generator=gen)
            out[key] = (value + 0.05 * float(value.std()) * noise).contiguous()
    assert sum(not torch.equal(out[k], w0[k]) for k in w0) == 8  # 2 blocks x 4 layers
    return out


def train(out: Path, lora_merge: str) -> dict:
    config = tiny(rounds=2, lora_merge=lora_merge)
    run_federated(config, out)
    federation = build_federation(
        config, dataset=config.dataset, seed=config.seed, beta=config.beta
    )  # the run's own builder and checkpoint reader
    RunFolder(out, config).load_checkpoint(federation.model)
    model = federation.model.eval()
    xs, ys = zip(*federation.test_source.batches(np.arange(federation.test_size), 64), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        logits = torch.cat([model(batch) for batch in x.split(64)])
    metrics = pd.read_csv(out / "metrics.csv")
    assert json.loads((out / "provenance.json").read_text())["model_weights"] == "random"
    return {
        "folder": out,
        "config": config,
        "logits": logits,
        "x": x,
        "y": y,
        "final_accuracy": float(metrics["test_accuracy"].iloc[-1]),
        "checkpoint": load_file(str(out / "checkpoint" / "global.safetensors")),
        "w0": independent_w0(config),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both runs, their four exports and the fresh process's logits of each."""
    root = tmp_path_factory.mktemp("export")
    runs = {mode: train(root / f"run-{mode}", mode) for mode in ("product", "svd")}
    exports = root / "exports"
    jobs, records = [], {}
    for mode, run in runs.items():
        inputs = root / f"inputs-{mode}.safetensors"
        save_file({"x": run["x"].contiguous(), "y": run["y"]}, str(inputs))
        bases = {
            "w0": root / f"w0-{mode}.safetensors",  # the independent W0
            "perturbed": root / f"w0-perturbed-{mode}.safetensors",
        }
        save_file(run["w0"], str(bases["w0"]))
        save_file(perturbed(run["w0"]), str(bases["perturbed"]))
        outs = {
            f"{mode}-timm": ("timm", exports / f"{mode}.safetensors", None),
            f"{mode}-peft": ("peft", exports / f"{mode}-peft", None),
        }
        if mode == "product":  # 32: the full rank of every layer, so the SVD keeps everything
            outs["product-peft-r32"] = ("peft", exports / "product-peft-r32", 32)
            outs["product-peft-r4"] = ("peft", exports / "product-peft-r4", 4)  # truncates
        else:  # another rank than the run's: the trained update re-factorised (rank <= 4)
            outs["svd-peft-r8"] = ("peft", exports / "svd-peft-r8", 8)
        for name, (fmt, path, rank) in outs.items():
            options = ExportOptions(rank=rank, check_samples=0)
            records[name] = export_run(run["folder"], fmt, path, options)
            meta = path.with_suffix(".json") if fmt == "timm" else path / REPORT_FILE
            job = {"format": fmt, "path": str(path), "meta": str(meta), "inputs": str(inputs)}
            jobs.append({**job, "name": name})
            if fmt == "peft":  # the adapter on the independent W0, and on a wrong one
                for which, base in bases.items():
                    jobs.append({**job, "name": f"{name}@{which}", "base": str(base)})
    result = root / "fresh.safetensors"
    subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs), str(result)],
        check=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(root)},
    )
    return runs, records, load_file(str(result))


@pytest.mark.parametrize(
    "name",
    ["product-timm", "svd-timm", "svd-peft", "product-peft", "product-peft-r32", "svd-peft-r8"],
)
def test_exact_exports_reproduce_the_run_in_a_fresh_process(exported, name):
    runs, records, fresh = exported
    run = runs[name.split("-")[0]]
    assert records[name]["exact"] is True
    diff = float((fresh[name] - run["logits"]).abs().max())
    assert diff < TOLERANCE, diff
    assert float(fresh[f"{name}/accuracy"]) == pytest.approx(run["final_accuracy"], abs=1e-12)
    check = records[name]["check"]
    assert check["whole_test_set"] and check["passed"]
    assert check["exported_top1"] == pytest.approx(run["final_accuracy"], abs=1e-12)


@pytest.mark.parametrize("name", ["svd-peft", "product-peft", "product-peft-r32", "svd-peft-r8"])
def test_exact_adapters_on_an_independent_w0_reproduce_the_run(exported, name):
    """The adapter loaded (fresh process) onto W0 built here from the run's weights source,
    not the W0 file the export wrote, gives the run's final model's logits; onto a W0 whose
    LoRA layers are 5 % off it does not: a wrong W0 in the export would be seen."""
    runs, records, fresh = exported
    run = runs[name.split("-")[0]]
    assert records[name]["exact"] is True
    right = float((fresh[f"{name}@w0"] - run["logits"]).abs().max())
    assert right < TOLERANCE, right
    assert float(fresh[f"{name}@w0/accuracy"]) == pytest.approx(run["final_accuracy"], abs=1e-12)
    wrong = float((fresh[f"{name}@perturbed"] - run["logits"]).abs().max())
    assert wrong > 100 * TOLERANCE, wrong  # far beyond the tolerance of the right W0


def test_the_w0_written_beside_the_adapter_is_the_runs(exported):
    """base_model.safetensors equals W0 rebuilt here with timm from the run's seed (every
    tensor, the initial head included); livar's own seeded build of the run's model agrees with
    that independent W0 outside the LoRA layers (a check of the independent construction)."""
    runs, _, _ = exported
    for mode, run in runs.items():
        w0 = run["w0"]
        folders = sorted((run["folder"].parent / "exports").glob(f"{mode}-peft*"))
        assert len(folders) == {"product": 3, "svd": 2}[mode], folders  # default and --rank
        for folder in folders:
            written = load_file(str(folder / BASE_FILE))
            assert written.keys() == w0.keys(), folder.name
            for key, value in w0.items():
                assert torch.equal(written[key], value), (folder.name, key)
        # the run's model as its builder seeds it: the same W0 outside the LoRA layers
        c = run["config"]
        seeded = build_federation(c, dataset=c.dataset, seed=c.seed, beta=c.beta).model.state_dict()
        for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
            assert torch.equal(seeded[f"base_model.model.{key}"], w0[key]), key


def test_timm_sidecar_and_file(exported):
    runs, records, _ = exported
    for mode in ("product", "svd"):
        record = records[f"{mode}-timm"]
        config = runs[mode]["config"]
        assert record["model"] == config.model and record["num_classes"] == 10
        assert record["create_kwargs"] == {
            "img_size": 16,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
        }
        assert record["run"]["config_hash"] == config.config_hash()
        assert record["provenance"]["git"].keys() == {"commit", "dirty"}
        file = runs[mode]["folder"].parent / "exports" / f"{mode}.safetensors"
        import hashlib

        assert record["sha256"] == "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
        assert json.loads(file.with_suffix(".json").read_text())["sha256"] == record["sha256"]
        state = load_file(str(file))
        assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(state)
        assert not any("lora" in key or "base_layer" in key for key in state)


def test_peft_adapter_folder(exported):
    runs, _, _ = exported
    folder = runs["svd"]["folder"].parent / "exports" / "svd-peft"
    names = {p.name for p in folder.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        BASE_FILE,
        "README.md",
        REPORT_FILE,
    } <= names
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["r"] == 4 and config["lora_alpha"] == 4.0 and config["modules_to_save"] == ["head"]
    )
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.head.weight" in adapter
    checkpoint = runs["svd"]["checkpoint"]
    # svd run: the adapter holds the trained factors themselves
    for key, value in checkpoint.items():
        if key.startswith("lora/"):
            assert torch.equal(adapter[key.removeprefix("lora/")], value)
    assert torch.equal(adapter["base_model.model.head.weight"], checkpoint["head/weight"])
    assert "Exact: yes" in (folder / "README.md").read_text()


def cumulative_update(run, w0, name: str) -> np.ndarray:
    """``W_final - W0`` of layer ``name`` in float64 with numpy, from the checkpoint's folded
    weights and current LoRA and the written W0."""
    checkpoint = run["checkpoint"]
    scaling = run["config"].lora_alpha / run["config"].lora_rank
    base = checkpoint[f"base/base_model.model.{name}.base_layer.weight"].double().numpy()
    b = checkpoint[f"lora/base_model.model.{name}.lora_B.weight"].double().numpy()
    a = checkpoint[f"lora/base_model.model.{name}.lora_A.weight"].double().numpy()
    return base - w0[f"{name}.weight"].double().numpy() + scaling * b @ a


def test_product_adapter_defaults_to_the_exact_rank(exported):
    """Without --rank a product run's adapter takes the largest numerical rank of a layer's
    update (numpy's matrix_rank on W_final - W0 from the files, float32 tolerance)."""
    runs, records, _ = exported
    run, record = runs["product"], records["product-peft"]
    w0 = load_file(str(run["folder"].parent / "exports" / "product-peft" / BASE_FILE))
    ranks = []
    for layer in record["layers"]:
        delta = cumulative_update(run, w0, layer["layer"])
        s = np.linalg.svd(delta, compute_uv=False)
        ranks.append(
            np.linalg.matrix_rank(delta, tol=s[0] * max(delta.shape) * np.finfo(np.float32).eps)
        )
    assert record["rank"] == max(ranks) == record["max_update_rank"]
    assert 4 < record["rank"] <= 24  # at most 2 rounds x 3 clients x rank 4: above the run's
    assert record["exact"] is True and "SVD at rank" in record["method"]


def test_product_adapter_at_a_smaller_rank_is_lossy_and_says_so(exported):
    runs, records, fresh = exported
    run, record = runs["product"], records["product-peft-r4"]
    assert record["exact"] is False and record["rank"] == 4
    assert f"leave --rank out (rank {record['max_update_rank']} here)" in record["exactness"]
    folder = run["folder"].parent / "exports" / "product-peft-r4"
    w0 = load_file(str(folder / BASE_FILE))
    for layer in record["layers"]:  # the errors recomputed with numpy from the files
        s = np.linalg.svd(cumulative_update(run, w0, layer["layer"]), compute_uv=False)
        expected = np.sqrt((s[4:] ** 2).sum() / (s**2).sum())
        assert layer["relative_error"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert 0.01 < layer["relative_error"] < 1
        assert 4 < layer["update_rank"] <= 24  # at most 2 rounds x 3 clients x rank 4
    diff = float((fresh["product-peft-r4"] - run["logits"]).abs().max())
    assert diff == pytest.approx(record["check"]["max_abs_logit_diff"], rel=1e-3, abs=1e-6)
    assert diff > TOLERANCE  # the truncation is visible in the logits
    assert "passed" not in record["check"]
    assert "Exact: no" in (folder / "README.md").read_text()


def test_cli_timm_export(exported, tmp_path, capsys):
    runs, _, _ = exported
    out = tmp_path / "cli.safetensors"
    assert main([str(runs["svd"]["folder"]), "--to", "timm", str(out), "--check-samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert "timm export" in printed and "exact: yes" in printed
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["check"]["samples"] == 8 and not sidecar["check"]["whole_test_set"]
    assert main([str(runs["svd"]["folder"]), "--to", "timm", str(out)]) == 2  # exists now
    assert "already exists" in capsys.readouterr().err
