"""benchmarks/gpu.py's pieces that need neither a GPU nor a run: the import blocker, the summary
of a (killed) run folder, the float32 weights it derives from the carried fp16 file and the
``livar-fed`` command it starts. The prepare step and the CPU dry run:
tests/integration/test_gpu_benchmark.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

GPU_PY = REPO / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_blocker_refuses_imports_as_if_not_installed():
    """In a fresh interpreter: ``import`` fails and ``find_spec`` says not installed."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(GPU_PY.parent)!r})
        import gpu
        assert gpu.block_imports(["flwr", "shap", ""]) == ["flwr", "shap"]
        assert importlib.util.find_spec("shap") is None
        for name in ("flwr", "flwr.app", "shap", "shap.plots"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(name + " imported")
        import json  # the others still import
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_blocker_refuses_a_package_already_imported(gpu):
    with pytest.raises(RuntimeError, match="already imported"):
        gpu.block_imports(["json"])


def test_a_killed_run_folder_is_summarised_from_its_completed_rounds(gpu, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text(
        json.dumps(
            [
                {"round": 1, "test_accuracy": 0.4, "test_loss": 1.2, "train_seconds": 2.0},
                {"round": 2, "test_accuracy": 0.5, "test_loss": 1.0, "train_seconds": 2.0},
            ]
        )
    )
    (folder / "paired.csv").write_text(
        "round,method,test_accuracy,test_loss,difference\n"
        "1,fedavg,0.35,1.3,-0.05\n1,livar-sigma,0.42,1.1,0.02\n"
        "2,fedavg,0.45,1.1,-0.05\n2,livar-sigma,0.55,0.9,0.05\n"
    )
    summary = gpu.summarise_run(folder)
    assert summary["completed_rounds"] == 2
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][0]["fedavg"] == 0.35
    assert summary["final_accuracy"] == {"livar": 0.5, "fedavg": 0.45, "livar-sigma": 0.55}
    assert summary["final_difference"] == pytest.approx({"fedavg": -0.05, "livar-sigma": 0.05})
    assert "summary" not in summary  # no summary.json: the run did not finish
    assert gpu.summarise_run(tmp_path / "missing")["completed_rounds"] == 0


@pytest.mark.parametrize("image_size", [28, 224, 518])
def test_fp32_weights_resample_the_grid_as_the_named_source(gpu, tmp_path, image_size):
    """The float32 file's position embedding equals what ``--weights dinov2-s14-imgfocus``
    installs (``apply_source_pos_embed``: plain bicubic from the native 37 x 37 grid)."""
    from safetensors.torch import load_file, save_file

    from livar_merge.federated.pretrained import apply_source_pos_embed

    gen = torch.Generator().manual_seed(0)
    carried = {
        "pos_embed": torch.randn(1, 1 + 37 * 37, 8, generator=gen),
        "blocks.0.mlp.fc1.weight": torch.randn(16, 8, generator=gen).half(),
    }
    source = tmp_path / "carried.safetensors"
    save_file(carried, str(source))
    path = gpu.fp32_weights(source, image_size, tmp_path)
    assert path == gpu.fp32_weights(source, image_size, tmp_path)  # made once per size
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    torch.testing.assert_close(
        tensors["blocks.0.mlp.fc1.weight"], carried["blocks.0.mlp.fc1.weight"].float()
    )

    grid = image_size // 14

    class Stub(torch.nn.Module):
        num_prefix_tokens = 1

        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + grid * grid, 8))
            self.patch_embed = torch.nn.Module()
            self.patch_embed.grid_size = (grid, grid)

    stub = Stub()
    if grid == 37:  # the native grid: timm loads it as it is, nothing resampled
        stub.pos_embed.data.copy_(carried["pos_embed"])
    apply_source_pos_embed(stub, source)
    torch.testing.assert_close(tensors["pos_embed"], stub.pos_embed.detach())


def test_the_livar_fed_command_is_the_paired_pretrained_run(gpu, tmp_path):
    args = Namespace(
        fed_image_size=224,
        fed_clients=10,
        fed_rounds=5,
        fed_local_epochs=2,
        fed_batch_size=32,
        fed_lr=1e-3,
        fed_rank=16,
        fed_min_client_samples=20,
        fed_beta=0.5,
        fed_seed=42,
        fed_max_train=None,
        fed_max_test=500,
        device="cuda",
        precision="bf16",
        threads=None,
        block=["flwr", "ray"],
    )
    out = tmp_path / "gpu-x-paired"
    command = gpu.fed_command(args, Path("w.safetensors"), Path("carry/fashion-mnist"), out)
    assert command[:3] == [sys.executable, str(GPU_PY), "fed"]
    assert "--block=flwr,ray" in command
    options = command[command.index("--") + 1 :]

    def value(option):
        return options[options.index(option) + 1]

    assert value("--model") == "vit_small_patch14_dinov2"
    assert value("--weights") == "w.safetensors"
    assert value("--data-root") == "carry/fashion-mnist"
    assert value("--method") == "livar"
    assert options[options.index("--paired") + 1 : options.index("--paired") + 3] == [
        "fedavg",
        "livar-sigma",
    ]
    assert (value("--device"), value("--precision"), value("--image-size")) == (
        "cuda",
        "bf16",
        "224",
    )
    assert value("--max-test") == "500" and "--max-train" not in options
    assert "--threads" not in options and value("--out") == str(out)
    # every option is one livar-fed accepts
    from livar_merge.apps.fed_cli import build_parser

    build_parser().parse_args(options)
    args.block = []
    assert "--block=" in gpu.fed_command(args, Path("w"), Path("d"), out)  # none refused
