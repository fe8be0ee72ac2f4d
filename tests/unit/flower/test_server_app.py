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
