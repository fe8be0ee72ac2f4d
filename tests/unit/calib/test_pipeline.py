"""Pipeline stages apart from training (livar_calib.pipeline): publishing, the NNLS join."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from livar_calib import pipeline
from livar_calib.proxy import ProxyRun
from livar_merge.errors import CalibrationError
from livar_merge.tables import GShapTable, make_table

VALUES = [[0.038, 0.038, 0.038], [0.1, 0.089, 0.078], [0.193, 0.118, 0.093]]


def _table(values, config_hash: str = "sha256:abc") -> GShapTable:
    return make_table("calib-pub", 1, values, provenance={"config_hash": config_hash})


def test_publish_takes_the_next_free_version_and_never_republishes(tmp_path):
    folder = tmp_path / "gshap"
    first = pipeline._publish(_table(VALUES), folder)
    assert first == folder / "calib-pub.v1.json"
    assert pipeline._publish(_table(VALUES), folder) == first  # the same table: not again
    other = _table(np.asarray(VALUES) * 2)
    assert pipeline._publish(other, folder) == folder / "calib-pub.v2.json"
    assert GShapTable.load(folder / "calib-pub.v2.json").version == 2
    (folder / "calib-pub.v9.json").write_bytes(first.read_bytes())  # v9: the next is v10
    rehashed = _table(VALUES, config_hash="sha256:def")
    assert pipeline._publish(rehashed, folder) == folder / "calib-pub.v10.json"
    assert sorted(p.name for p in folder.iterdir()) == [
        "calib-pub.v1.json",
        "calib-pub.v10.json",
        "calib-pub.v2.json",
        "calib-pub.v9.json",
    ]


def test_collect_rows_names_the_rows_nnls_left_without_lambda(tmp_path, monkeypatch):
    run = ProxyRun(0.5, 0)
    folder = tmp_path / "proxy" / run.run_id
    folder.mkdir(parents=True)
    keys = [(run.repeat_id(1), f"client_{m}", layer) for m in range(2) for layer in ("l0", "l1")]
    rows = pd.DataFrame(keys, columns=["repeat_id", "client", "layer"])
    rows.to_csv(folder / "round_1.csv", index=False)
    lam = rows.iloc[:-1].assign(lam=1.0)  # no lambda for (client_1, l1)
    monkeypatch.setattr(pipeline, "proxy_runs", lambda config: [run])
    monkeypatch.setattr(pipeline, "load_repeat", lambda path: path)
    monkeypatch.setattr(pipeline, "nnls_repeat", lambda deltas: lam)
    with pytest.raises(CalibrationError, match=r"1 rows of repeat\(s\) \['b0.5-s0-r1'\].*client_1"):
        pipeline.collect_rows(SimpleNamespace(rounds=1), tmp_path)
