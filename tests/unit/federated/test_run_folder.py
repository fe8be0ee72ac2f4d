"""The run-folder writer and read-back (livar_merge.federated.run_folder)."""

from __future__ import annotations

import copy

import pytest
import torch

from livar_merge.federated.global_state import global_tensors
from livar_merge.federated.run_folder import RunFolder, RunFolderError
from livar_merge.federated.server import FederatedServer
from tests.helpers import NUM_CLASSES
from tests.helpers import fake_server_update as fake_update


# ---------------------------------------------------------------------------- run folder
def test_run_folder_checkpoint_round_trip_and_refusals(model, tmp_path):
    from livar_merge.federated.config import resolve_config

    config = resolve_config("tiny", None, {"method": "fedproto"})
    folder = RunFolder(tmp_path / "run", config)
    assert folder.check(resume=True) is False  # nothing to resume yet
    server = FederatedServer(copy.deepcopy(model), method="fedavg", seed=0)
    updates = [fake_update(model, f"client_{m}", m) for m in range(2)]
    record = server.aggregate_round(1, updates)
    row, paired = server.metrics_row(record, 0.5, 1.0)
    folder.write_header({"seed": 0})
    folder.add_round(record, row, paired)
    folder.rows.memories["client_0"] = {"omega": [0.1], "steps": 1, "layer-names": ["x"]}
    folder.write_tables()
    prototypes = {"server/prototypes": torch.randn(NUM_CLASSES, 4)}
    folder.save_checkpoint(server.model, prototypes)
    assert {p.name for p in folder.out.iterdir()} >= {
        "config.json",
        "provenance.json",
        "metrics.csv",
        "metrics.json",
        "clients.csv",
        "alpha.csv",
        "head_weights.csv",
        "checkpoint",
    }
    assert not (folder.out / "paired.csv").exists() and not (folder.out / "replies.csv").exists()
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        RunFolder(folder.out, config).check(resume=False)
    other = resolve_config("tiny", None, {"method": "fedproto", "beta": 0.1})
    with pytest.raises(RunFolderError, match="different configuration"):
        RunFolder(folder.out, other).check(resume=True)
    resumed = RunFolder(folder.out, config)
    assert resumed.check(resume=True) is True
    fresh = copy.deepcopy(model)
    server_tensors = resumed.load_checkpoint(fresh)
    torch.testing.assert_close(server_tensors["server/prototypes"], prototypes["server/prototypes"])
    for key, value in global_tensors(server.model, "product").items():
        torch.testing.assert_close(global_tensors(fresh, "product")[key], value)
    assert resumed.rows.metrics == folder.rows.metrics
    assert resumed.rows.memories == folder.rows.memories and resumed.rows.completed_rounds == 1
