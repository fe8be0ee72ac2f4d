"""The ServerApp's run config to livar-fed options (livar_merge.flower.server_app)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from livar_merge.errors import RunConfigError  # noqa: E402
from livar_merge.flower.server_app import config_from_run_config  # noqa: E402
from livar_merge.flower.strategy import FlowerSettings  # noqa: E402


def test_run_config_to_livar_fed_options(tmp_path):
    file = tmp_path / "opts.toml"
    file.write_text('lr = 0.02\nbeta = 0.3\nmethod = "fedavg"\n')
    config, settings = config_from_run_config(
        {
            "preset": "tiny",
            "config-file": str(file),
            "options": "beta=0.1 local-epochs=2",
            "rounds": 3,
            "num-clients": "",
            "min-replies": 2,
            "round-timeout": 60.0,
        }
    )
    assert (config.rounds, config.num_clients, config.lr, config.beta) == (3, 3, 0.02, 0.1)
    assert config.local_epochs == 2 and config.method == "fedavg"
    assert settings.min_replies == 2 and settings.round_timeout == 60.0
    assert settings.resolved_min_replies(5) == 2
    assert FlowerSettings().resolved_min_replies(5) == 3  # default: a majority
    with pytest.raises(RunConfigError, match=r"run config keys \['not-an-option'\] are neither"):
        config_from_run_config({"not-an-option": 1})


def test_run_control_keys_are_parsed_and_bad_values_named():
    from livar_merge.flower.server_app import RunControl

    assert RunControl.from_run_config({}) == RunControl(resume=False, stop_after=None)
    assert RunControl.from_run_config({"resume": "true", "stop-after": "3"}) == RunControl(
        resume=True, stop_after=3
    )
    assert RunControl.from_run_config({"resume": True, "stop-after": 2}).stop_after == 2
    assert RunControl.from_run_config({"resume": " False "}).resume is False
    config, _ = config_from_run_config({"preset": "tiny", "resume": "true", "stop-after": 1})
    assert config.rounds == 2  # control keys are not livar-fed options
    for bad, key in [({"resume": "yes"}, "resume"), ({"resume": 1}, "resume"),
                     ({"stop-after": "0"}, "stop-after"), ({"stop-after": "two"}, "stop-after"),
                     ({"stop-after": True}, "stop-after")]:  # fmt: skip
        with pytest.raises(RunConfigError, match=f"run config '{key}'"):
            RunControl.from_run_config(bad)


def test_resume_refuses_another_configuration_and_node_held_omega_before_building(tmp_path):
    """Resuming checks the folder first: a run of other options, or cumulative omega (held in
    the nodes' state of the old Flower run), is refused with the reason; nothing is written."""
    from livar_merge.errors import RunFolderError
    from livar_merge.federated.config import resolve_config
    from livar_merge.federated.run_folder import RunFolder
    from livar_merge.flower.server_app import RunControl, ServerRun

    out = tmp_path / "run"
    config = resolve_config("tiny", None, {"out": str(out), "engine": "flower"})
    resume = RunControl(resume=True)
    assert ServerRun.check_folder(config, resume) is False  # nothing to resume yet
    RunFolder(out, config).write_header({})
    assert ServerRun.check_folder(config, resume) is True
    other = resolve_config("tiny", None, {"out": str(out), "lr": 0.5})
    with pytest.raises(RunFolderError, match="different configuration.*'lr'"):
        ServerRun.check_folder(other, resume)
    cumulative = resolve_config("tiny", None, {"out": str(out), "omega_cumulative": True})
    with pytest.raises(RunConfigError, match="omega_cumulative.*starts empty"):
        ServerRun.check_folder(cumulative, resume)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunFolderError, match="already holds a run|different"):
        (out / "summary.json").write_text("{}")
        ServerRun.check_folder(config, RunControl())
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "summary.json"])
