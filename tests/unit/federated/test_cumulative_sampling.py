"""Cumulative omega (``--omega-cumulative``, set by ``--protocol released``) with client sampling
is refused before any data is read: a client's running totals would count the rounds it was
sampled in. Full participation keeps cumulative omega."""

from __future__ import annotations

import pytest

from livar_merge.apps import fed_cli as cli
from livar_merge.errors import ConfigError
from livar_merge.federated.config import resolve_config


@pytest.mark.parametrize(
    "sampling", [{"clients_per_round": 2}, {"fraction_train": 0.5}, {"fraction_train": 0.9}]
)
@pytest.mark.parametrize(
    "cumulative", [{"omega_cumulative": True}, {"protocol": "released"}], ids=["option", "released"]
)
def test_cumulative_omega_with_client_sampling_is_refused(sampling, cumulative):
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny", None, {**cumulative, **sampling})
    message = str(err.value)
    assert "omega_cumulative" in message and "clients_per_round/fraction_train" in message
    assert "how often" in message and "--no-omega-cumulative" in message


def test_cumulative_omega_with_full_participation_is_kept():
    assert resolve_config("tiny", None, {"omega_cumulative": True}).omega_cumulative
    every = resolve_config("tiny", None, {"omega_cumulative": True, "clients_per_round": 3})
    assert every.omega_cumulative and every.participants_per_round() is None  # K = M = 3
    released = resolve_config("tiny", None, {"protocol": "released"})
    assert released.omega_cumulative and released.participants_per_round() is None
    explicit = resolve_config(
        "tiny", None, {"protocol": "released", "omega_cumulative": False, "clients_per_round": 2}
    )
    assert not explicit.omega_cumulative and explicit.participants_per_round() == 2


def test_the_cli_refuses_before_reading_data_or_creating_the_folder(tmp_path, monkeypatch, capsys):
    import livar_merge.federated.federation as federation

    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(federation, "load_train_test", no_data)
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--omega-cumulative", "--clients-per-round", "2", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert not out.exists()
    assert "omega_cumulative" in capsys.readouterr().err


@pytest.mark.slow
def test_a_full_participation_run_with_cumulative_omega_completes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--omega-cumulative", "--rounds", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "rounds 2/2" in capsys.readouterr().out
    assert (out / "summary.json").is_file()
