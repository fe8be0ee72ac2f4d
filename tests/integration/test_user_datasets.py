"""``livar-fed`` on a user's own data: a class-folder layout and a Hugging Face ``save_to_disk``
folder written by the test, with a flwr-datasets partitioner."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from livar_merge.apps.fed_cli import main
from tests.unit.federated.test_user_datasets import hf_splits, image_folder


@pytest.mark.slow
def test_livar_fed_trains_on_an_image_folder_with_the_iid_partitioner(tmp_path):
    pytest.importorskip("flwr_datasets")
    root = image_folder(tmp_path / "pets", per_class=12)
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--dataset", "imagefolder", "--data-root", str(root)]
    args += ["--partitioner", "iid", "--num-clients", "2", "--rounds", "1", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_rounds"] == 1 and summary["final_accuracy"] is not None
    partition = pd.read_csv(out / "partition.csv", index_col=0)
    assert partition["total"].tolist() == [15, 14] or partition["total"].tolist() == [14, 15]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["partitioner"] == "iid" and config["dataset"] == "imagefolder"
    provenance = json.loads((out / "provenance.json").read_text())
    assert str(root) in json.dumps(provenance)  # the data's source is recorded


@pytest.mark.slow
def test_livar_fed_trains_on_a_hugging_face_save_to_disk_folder(tmp_path):
    pytest.importorskip("datasets")
    hf_splits(per_class=8).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--dataset", "hf", "--data-root", str(tmp_path / "saved")]
    args += ["--image-column", "img", "--label-column", "fine", "--num-clients", "2"]
    args += ["--rounds", "1", "--min-client-samples", "2", "--out", str(out)]
    assert main(args) == 0
    partition = pd.read_csv(out / "partition.csv", index_col=0)
    assert partition["total"].sum() == 24  # the train split
    assert json.loads((out / "summary.json").read_text())["completed_rounds"] == 1
