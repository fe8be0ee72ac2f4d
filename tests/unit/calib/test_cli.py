"""livar-calibrate's refusals before anything is written (livar_calib.cli)."""

import pytest

from livar_calib.cli import main


def test_bad_options_fail_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--next-start", "magic"])
    missing, out = str(tmp_path / "missing"), str(tmp_path / "r")
    argv = ["--preset", "tiny", "--proxy", "tiny-imagenet", "--data-root", missing, "--out", out]
    assert main(argv) == 2
    assert "tiny-imagenet" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written: a correct rerun is not refused


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--betas", "-1"], "--betas"),
        (["--seeds", "0", "0"], "--seeds"),
        (["--holdout-fraction", "1.5"], "--holdout-fraction"),
        (["--rounds", "0"], "--rounds"),
        (["--edges", "magic"], "--edges"),
    ],
)
def test_invalid_options_are_refused_before_anything_is_written(tmp_path, capsys, options, message):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", *options, "--out", str(out)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
