"""The runnable example of docs/flower.md: examples/custom_client_app.py with LivarStrategy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a running task's identity

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from tests.helpers import REPO, FakeGrid  # noqa: E402


def test_the_readme_client_app_example_trains_with_the_strategy():
    """examples/custom_client_app.py: its ClientApp's replies (a plain peft model, our signals,
    pack_reply) pass the strategy's validation and LIVAR aggregates them, two rounds."""
    import importlib.util

    from flwr.app import Context

    spec = importlib.util.spec_from_file_location(
        "custom_client_app", REPO / "examples" / "custom_client_app.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    strategy = example.make_strategy()
    nodes = [30, 31, 32]
    grid = FakeGrid(nodes)
    arrays = strategy.initial_arrays()
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(1, node, {"partition-id": node - 30}, RecordDict(), {})
            replies.append(example.train(message, context))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert metrics["replies-accepted"] == 3 and metrics["replies-dropped"] == 0
        assert metrics["train-loss"] > 0
    record = strategy.history[-1]
    assert [u.client_id for u in record.updates] == ["client_0", "client_1", "client_2"]
    assert np.isfinite(record.result.lora_weights).all()
    # LIVAR's weights come from the G_SHAP table, not the (equal) sample counts
    assert not np.allclose(record.result.lora_weights, 1 / 3)
