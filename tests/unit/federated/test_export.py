"""livar-export's refusals (before any model is built) and its SVD re-factorisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from livar_merge.apps.export import ExportOptions, cli, export_run, main, peft_writer
from livar_merge.apps.export.source import check_output, check_run_folder
from livar_merge.errors import ExportError, LivarError
from tests.helpers import tiny


@pytest.fixture
def run_dir(tmp_path):
    """A finished-looking tiny run folder: header, a checkpoint, a summary (no real model)."""
    config = tiny()
    folder = tmp_path / "run"
    folder.mkdir()
    document = {"config": config.to_dict(), "config_hash": config.config_hash()}
    (folder / "config.json").write_text(json.dumps(document))
    (folder / "checkpoint").mkdir()
    save_file({"head/weight": torch.zeros(10, 32)}, str(folder / "checkpoint/global.safetensors"))
    (folder / "checkpoint/state.json").write_text("{}")
    (folder / "summary.json").write_text("{}")
    return folder


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the export gets as far as building the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_run was called: the refusal came too late")

    monkeypatch.setattr(cli, "load_run", refuse)


def test_a_complete_folder_passes_the_checks(run_dir):
    inputs = check_run_folder(run_dir)
    assert inputs.finished and inputs.config.lora_merge == "product"
    assert inputs.config_hash == tiny().config_hash()


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", "config.json is missing"),
        ("checkpoint/global.safetensors", "no checkpoint"),
        ("checkpoint/state.json", "no checkpoint"),
    ],
)
def test_refuses_a_folder_without_config_or_checkpoint(run_dir, remove, message, no_heavy_work):
    (run_dir / remove).unlink()
    with pytest.raises(ExportError, match=message):
        export_run(run_dir, "timm", run_dir.parent / "out.safetensors")


def test_refuses_a_missing_folder(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        check_run_folder(tmp_path / "nowhere")


def test_unfinished_run_needs_partial(run_dir):
    (run_dir / "summary.json").unlink()
    with pytest.raises(ExportError, match="--partial"):
        check_run_folder(run_dir)
    assert not check_run_folder(run_dir, partial=True).finished


def test_refuses_a_config_it_cannot_reproduce(run_dir):
    document = json.loads((run_dir / "config.json").read_text())
    document["config_hash"] = "0" * 64
    (run_dir / "config.json").write_text(json.dumps(document))
    with pytest.raises(ExportError, match="config hash"):
        check_run_folder(run_dir)
    document["config"]["no_such_option"] = 1
    (run_dir / "config.json").write_text(json.dumps(document))
    with pytest.raises(ExportError, match="no_such_option"):
        check_run_folder(run_dir)


def test_refuses_existing_outputs(tmp_path, run_dir, no_heavy_work):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ExportError, match="already exists"):
        export_run(run_dir, "timm", file)
    file.unlink()
    (tmp_path / "model.json").write_text("{}")  # the sidecar alone is enough
    with pytest.raises(ExportError, match="model.json already exists"):
        export_run(run_dir, "timm", file)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(run_dir, "peft", folder)
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(run_dir, "peft", folder / "adapter_config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output("peft", empty) == empty  # an empty folder is fine


def test_refuses_bad_format_and_options(tmp_path, run_dir, no_heavy_work):
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_run(run_dir, "onnx", tmp_path / "x")
    with pytest.raises(ExportError, match=r"\.safetensors"):
        check_output("timm", tmp_path / "model.pt")
    with pytest.raises(ExportError, match="--rank"):
        export_run(run_dir, "timm", tmp_path / "m.safetensors", ExportOptions(rank=8))
    assert issubclass(ExportError, LivarError)


def test_cli_usage_errors(tmp_path, run_dir, capsys, no_heavy_work):
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--to", "onnx", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "unknown format 'onnx'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--to", "timm", str(tmp_path / "m.safetensors"), "--rank", "4"])
    assert exit_info.value.code == 2 and "--rank" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--to", "peft", str(tmp_path / "a"), "--rank", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir)])  # --to is required
    assert exit_info.value.code == 2


def test_cli_reports_a_refused_export(tmp_path, run_dir, capsys, no_heavy_work):
    (run_dir / "checkpoint/state.json").unlink()
    assert main([str(run_dir), "--to", "peft", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("livar-export: error:") and "no checkpoint" in err
    assert not (tmp_path / "adapter").exists()


def test_help_does_not_import_torch_stack():
    import subprocess
    import sys

    code = (
        "import sys; from livar_merge.apps.export import cli; cli.build_parser(); "
        "print(any(m in sys.modules for m in ('torch', 'timm', 'peft')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- re-factorisation
def test_svd_factors_exact_for_a_low_rank_update():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    factor_a, factor_b, stats = peft_writer.svd_factors(delta, 5)
    assert factor_a.shape == (5, 20) and factor_b.shape == (48, 5)
    torch.testing.assert_close(factor_b @ factor_a, delta, atol=1e-5, rtol=0)
    assert stats["update_rank"] == 3 and stats["relative_error"] < 1e-6
    assert stats["shape"] == [48, 20]


def test_svd_factors_error_is_the_discarded_tail():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(30, 12, generator=gen)
    factor_a, factor_b, stats = peft_writer.svd_factors(delta, 4)
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    expected = np.sqrt((s[4:] ** 2).sum() / (s**2).sum())
    assert stats["relative_error"] == pytest.approx(expected, rel=1e-9)
    residual = np.linalg.norm((delta - factor_b @ factor_a).double().numpy()) / np.linalg.norm(s)
    assert residual == pytest.approx(expected, rel=1e-4)
    assert stats["update_rank"] == 12


def test_svd_factors_pads_beyond_the_layer_rank():
    delta = torch.eye(6)[:, :4] @ torch.ones(4, 4)
    factor_a, factor_b, stats = peft_writer.svd_factors(delta, 10)
    assert factor_a.shape == (10, 4) and factor_b.shape == (6, 10)
    assert torch.all(factor_b[:, 4:] == 0) and torch.all(factor_a[4:] == 0)
    torch.testing.assert_close(factor_b @ factor_a, delta, atol=1e-5, rtol=0)
    assert stats["update_rank"] == 1 and stats["relative_error"] < 1e-12
    zero_a, zero_b, zero = peft_writer.svd_factors(torch.zeros(5, 3), 2)
    assert zero["relative_error"] == 0.0 and zero["update_rank"] == 0
    assert not zero_a.any() and not zero_b.any()
