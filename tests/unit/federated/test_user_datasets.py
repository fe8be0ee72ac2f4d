"""``imagefolder`` and ``hf`` datasets on fixtures written in exactly their formats (PIL image
files in class folders; ``datasets.DatasetDict.save_to_disk``; the Hub's parquet files), the
malformed layouts refused naming the file or column, and the flwr-datasets partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livar_merge.errors import DatasetError, PartitionError
from livar_merge.federated.datasets import load_dataset
from livar_merge.federated.partition import dirichlet_partition, partition_clients

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}


def png(path: Path, colour: tuple[int, int, int], size: int = 12, fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


def image_folder(root: Path, per_class: int = 5, classes=COLOURS) -> Path:
    for name, colour in classes.items():
        for i in range(per_class):
            fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            png(root / name / f"{name}{i}.{suffix}", colour, fmt=fmt)
    first = root / sorted(classes)[0]
    (first / "notes.txt").write_text("not an image: skipped as ImageFolder does")
    return root


def test_imagefolder_class_folders_split_and_decoded(tmp_path):
    root = image_folder(tmp_path / "pets")
    splits = load_dataset("imagefolder", root, image_size=8, seed=0, test_fraction=0.4)
    assert splits.classes == ["cat", "dog", "eel"]  # sorted folder names, as ImageFolder
    assert len(splits.train) == 9 and len(splits.test) == 6
    assert np.bincount(splits.test.labels).tolist() == [2, 2, 2]  # stratified
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    expected = COLOURS[splits.classes[label]]
    assert image[:, 4, 4].tolist() == pytest.approx(expected, abs=3)  # jpeg rounding
    again = load_dataset("imagefolder", root, image_size=8, seed=0, test_fraction=0.4)
    assert np.array_equal(again.test.labels, splits.test.labels)


def test_imagefolder_train_test_folders_map_classes_by_name(tmp_path):
    image_folder(tmp_path / "d" / "train")
    image_folder(tmp_path / "d" / "val", per_class=2, classes={"dog": COLOURS["dog"]})
    splits = load_dataset("imagefolder", tmp_path / "d", image_size=None, seed=0)
    assert splits.classes == ["cat", "dog", "eel"]
    assert len(splits.train) == 15 and splits.test.labels.tolist() == [1, 1]  # "dog" is 1
    assert splits.test[0][0][:, 0, 0].tolist() == list(COLOURS["dog"])


def test_imagefolder_refuses_malformed_layouts_naming_the_place(tmp_path):
    empty = image_folder(tmp_path / "a")
    (empty / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*/a/fox contains no images"):
        load_dataset("imagefolder", empty, seed=0)
    corrupt = image_folder(tmp_path / "b")
    (corrupt / "dog" / "dog2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"cannot decode image .*/b/dog/dog2.png"):
        load_dataset("imagefolder", corrupt, seed=0)
    split = tmp_path / "c"
    image_folder(split / "train", classes={"cat": COLOURS["cat"], "dog": COLOURS["dog"]})
    image_folder(split / "test")
    with pytest.raises(DatasetError, match=r"class folder\(s\) eel of .*/c/test have no folder"):
        load_dataset("imagefolder", split, seed=0)
    half = tmp_path / "e"
    image_folder(half / "train")
    with pytest.raises(DatasetError, match=r"found .*/e/train but not its other part"):
        load_dataset("imagefolder", half, seed=0)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "missing", seed=0)


def hf_splits(per_class: int = 4, label_names=("cat", "dog", "eel")):
    import io

    import datasets
    from PIL import Image

    def split(n: int) -> datasets.Dataset:
        images, labels = [], []
        for label, name in enumerate(label_names):
            for _ in range(n):
                buffer = io.BytesIO()
                Image.new("RGB", (10, 10), COLOURS[name]).save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": None})
                labels.append(label)
        features = datasets.Features(
            {"img": datasets.Image(), "fine": datasets.ClassLabel(names=list(label_names))}
        )
        return datasets.Dataset.from_dict({"img": images, "fine": labels}, features=features)

    return datasets.DatasetDict({"train": split(per_class), "validation": split(2)})


def test_hf_save_to_disk_with_named_columns(tmp_path):
    hf_splits().save_to_disk(str(tmp_path / "saved"))
    splits = load_dataset(
        "hf", tmp_path / "saved", image_size=6, seed=0, image_column="img", label_column="fine"
    )
    assert splits.classes == ["cat", "dog", "eel"]  # the ClassLabel's names
    assert len(splits.train) == 12 and len(splits.test) == 6
    image, label = splits.test[5]
    assert label == 2 and image.shape == (3, 6, 6)
    assert image[:, 3, 3].tolist() == list(COLOURS["eel"])
    with pytest.raises(DatasetError, match=r"no column 'image', 'label'.*columns: img, fine"):
        load_dataset("hf", tmp_path / "saved", seed=0)


def test_hf_parquet_files_and_a_single_split(tmp_path):
    dataset = hf_splits()
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset["train"].to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    dataset["validation"].to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    splits = load_dataset("hf", tmp_path / "hub", seed=0, image_column="img", label_column="fine")
    assert splits.classes == ["cat", "dog", "eel"]
    assert (len(splits.train), len(splits.test)) == (12, 6)
    dataset["train"].save_to_disk(str(tmp_path / "one"))  # one Dataset: split by test_fraction
    one = load_dataset(
        "hf", tmp_path / "one", seed=0, test_fraction=0.25, image_column="img", label_column="fine"
    )
    assert (len(one.train), len(one.test)) == (9, 3)


def test_hf_refuses_wrong_label_types_corrupt_images_and_unseen_test_classes(tmp_path):
    import datasets

    dataset = hf_splits()
    text = dataset["train"].cast_column("fine", datasets.Value("string"))
    text.save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DatasetError, match=r"label column 'fine' is string, not integer"):
        load_dataset("hf", tmp_path / "text", seed=0, image_column="img", label_column="fine")
    broken = dataset["train"].cast_column("img", datasets.Image(decode=False))
    rows = broken.to_dict()
    rows["img"][3] = {"bytes": b"not an image", "path": None}
    datasets.Dataset.from_dict(rows, features=broken.features).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DatasetError, match=r"cannot decode image .*/bad row 3"):
        load_dataset("hf", tmp_path / "bad", seed=0, image_column="img", label_column="fine")
    unseen = datasets.DatasetDict(
        {"train": dataset["train"].filter(lambda r: r["fine"] != 2), "test": dataset["validation"]}
    )
    unseen.save_to_disk(str(tmp_path / "unseen"))
    with pytest.raises(DatasetError, match=r"class\(es\) \[2\] of the test split never occur"):
        load_dataset("hf", tmp_path / "unseen", seed=0, image_column="img", label_column="fine")


@pytest.mark.parametrize("partitioner", ["iid", "shards", "pathological", "flwr-dirichlet"])
def test_flwr_partitioners_are_seeded_disjoint_and_cover_what_they_split(partitioner):
    labels = np.repeat(np.arange(10), 30)
    kwargs = {"partitioner": partitioner, "beta": 0.5, "min_samples": 1}
    parts = partition_clients(labels, 5, seed=3, **kwargs)
    again = partition_clients(labels, 5, seed=3, **kwargs)
    other = partition_clients(labels, 5, seed=4, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    classes = [len(np.unique(labels[p])) for p in parts]
    if partitioner == "iid":
        assert sorted(len(p) for p in parts) == [60] * 5 and min(classes) >= 8
    if partitioner == "pathological":
        assert max(classes) <= 2
    if partitioner == "shards":
        assert all(len(p) == 60 for p in parts) and max(classes) <= 4


def test_the_default_dirichlet_is_todays_and_bad_partitions_are_refused():
    labels = np.repeat(np.arange(4), 25)
    today = dirichlet_partition(labels, 3, 0.5, seed=7, min_samples=2)
    default = partition_clients(labels, 3, beta=0.5, seed=7, min_samples=2)
    assert all(np.array_equal(a, b) for a, b in zip(today, default, strict=True))
    with pytest.raises(PartitionError, match="client_.* fewer than min_client_samples 40"):
        partition_clients(labels, 3, partitioner="pathological", beta=0.5, seed=0, min_samples=40)


def test_new_data_options_keep_earlier_hashes_and_enter_the_hash_when_set():
    from livar_merge.federated.config import resolve_config

    base = resolve_config("tiny", None, {})
    for option, value in [("partitioner", "iid"), ("test_fraction", 0.3), ("label_column", "y")]:
        assert resolve_config("tiny", None, {option: value}).config_hash() != base.config_hash()
    body = {k: v for k, v in base.to_dict().items()}
    assert body["partitioner"] == "dirichlet"  # recorded in config.json
