"""The client side's memory codec and train report (livar_merge.federated.client)."""

from __future__ import annotations

import copy
import json

import torch

from livar_merge.federated.client import ClientMemory, TrainReport
from livar_merge.federated.run_folder import client_rows
from livar_merge.federated.server import FederatedServer
from livar_merge.signals import ImportanceTracker
from tests.helpers import fake_server_update as fake_update


# ------------------------------------------------------------------------- memory codec
def test_memory_codec_keeps_float64_exactly(model):
    tracker = ImportanceTracker(model)
    omega = torch.tensor([1 / 3, 1e-300, 2.0**60 + 1.0] * (len(tracker.layer_names) * 2 // 3))
    state = {**tracker.state_dict(), "omega": omega.double(), "steps": 9}
    record = ClientMemory(tracker_state=state).to_record()
    json_round_trip = json.loads(json.dumps(record))
    restored = ClientMemory.from_record(json_round_trip).tracker_state
    assert restored["omega"].dtype == torch.float64
    assert torch.equal(restored["omega"], omega.double())  # float32 would round 1/3
    assert restored["steps"] == 9 and restored["layer_names"] == list(tracker.layer_names)
    legacy = {"tracker_state": {**record, "layer_names": record["layer-names"]}}
    assert torch.equal(ClientMemory.from_record(legacy).tracker_state["omega"], omega.double())
    assert ClientMemory.from_record(None).tracker_state is None
    assert ClientMemory().to_record() is None


def test_train_report_is_the_source_of_client_rows(model):
    report = TrainReport(loss=0.5, accuracy=0.8, steps=3, seconds=1.5, upload_bytes=10)
    update = fake_update(model, "client_0", 0)
    update.report = report.metrics()
    server = FederatedServer(copy.deepcopy(model), method="fedavg", seed=0)
    (row,) = client_rows(server.aggregate_round(1, [update]))
    assert row == {
        "round": 1,
        "client": "client_0",
        "num_samples": update.num_samples,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "steps": 3,
        "seconds": 1.5,
        "statistics_seconds": 0.0,
        "upload_bytes": 10,
        "statistics_bytes": 0,
    }
