"""Tests of livar_merge.federated.datasets: every format written to tmp_path in its real layout."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from livar_merge.errors import LivarError
from livar_merge.federated import datasets as D
from livar_merge.federated.config import BUILTIN_DATASETS
from livar_merge.federated.datasets import (
    DatasetError,
    FileImages,
    InMemoryImages,
    available_datasets,
    load_dataset,
    stratified_subsample,
    subset,
)
from livar_merge.federated.datasets.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
)
from livar_merge.federated.datasets.splits import stratified_split
from tests.helpers import H, W, colour, fresh_imports, write_jpeg, write_tiny_folder

REGISTERED = sorted(BUILTIN_DATASETS)  # test_builtin_dataset_names_... checks it is the registry


JPEG_TOLERANCE = 4  # max |error| of a solid-colour JPEG saved at quality 95 (measured <= 2)


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG encoding of uint8 [H, W, 3]."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_solid(image: torch.Tensor, rgb: tuple[int, int, int], hw=(H, W)) -> None:
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, *hw)
    expected = torch.tensor(rgb, dtype=torch.int16)[:, None, None]
    assert (image.to(torch.int16) - expected).abs().max().item() <= JPEG_TOLERANCE


def class_folders(root: Path, counts: dict[str, int], suffix: str = ".jpg") -> dict[Path, tuple]:
    """Class folders root/<name>/img_<i><suffix>; returns {path: (label, colour)}."""
    written = {}
    for label, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            path = root / name / f"img_{i:03d}{suffix}"
            write_jpeg(path, colour(label, i))
            written[path] = (label, colour(label, i))
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx ubyte file: 0, 0, 0x08, ndim, big-endian uint32 dims, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, train: int = 6, test: int = 4, hw=(7, 5), gz_train=True) -> dict:
    """The four Fashion-MNIST idx files (train gzipped, test raw by default)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(test, dtype=np.uint8) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if name.startswith("train") and gz_train:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


def write_cifar(root: Path, protocol: int = pickle.HIGHEST_PROTOCOL, names_as_bytes=False):
    """cifar-100-python/{train,test,meta} pickles of dicts with bytes keys."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"class{i}" for i in range(100)]
    batches = {}
    for split, n in (("train", 7), ("test", 3)):
        batch = {
            b"batch_label": b"training batch 1 of 1",
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"fine_labels": [int(x) for x in rng.integers(0, 100, size=n)],
            b"coarse_labels": [0] * n,
            b"filenames": [b"f.png"] * n,
        }
        with (folder / split).open("wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        batches[split] = batch
    meta = {b"fine_label_names": [n.encode() if names_as_bytes else n for n in names]}
    with (folder / "meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=protocol)
    return folder, batches, names


def write_tiny_parquet(root: Path, labels_train, labels_valid, shards: int = 2) -> dict:
    """data/train-*.parquet and data/valid-*.parquet with struct image column and int label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    (root / "data").mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {}
    for split, labels, count in (("train", labels_train, shards), ("valid", labels_valid, 1)):
        pixels = rng.integers(0, 256, size=(len(labels), 6, 9, 3), dtype=np.uint8)
        arrays[split] = pixels
        for shard, rows in enumerate(np.array_split(np.arange(len(labels)), count)):
            images = [{"bytes": png_bytes(pixels[r]), "path": f"{r}.JPEG"} for r in rows]
            table = pa.table(
                {
                    "image": pa.array(images, type=image_type),
                    "label": pa.array([int(labels[r]) for r in rows], type=pa.int64()),
                }
            )
            pq.write_table(table, root / "data" / f"{split}-{shard:05d}-of-{count:05d}.parquet")
    return arrays


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


def write_cub(root: Path) -> tuple[Path, list[tuple[int, str, int, int]]]:
    """CUB_200_2011/ with its four metadata files; rows (id, relpath, label1, is_train)."""
    folder = root / "CUB_200_2011"
    rows = []
    for image_id in range(1, 7):
        label = 1 if image_id <= 3 else 2
        rel = f"{CUB_CLASSES[label - 1]}/bird_{image_id:04d}.jpg"
        rows.append((image_id, rel, label, int(image_id % 3 != 0)))
        write_jpeg(folder / "images" / rel, colour(label - 1, image_id))
    (folder / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (folder / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CUB_CLASSES, 1)))
    return folder, rows


def raises_naming(path: Path | str, *args, **kwargs) -> DatasetError:
    """load_dataset(*args) raises a DatasetError whose message contains ``path``."""
    with pytest.raises(DatasetError) as info:
        ds = load_dataset(*args, **kwargs)
        for split in (ds.train, ds.test):  # lazily decoded datasets fail on access
            for i in range(len(split)):
                split[i]
    assert str(path) in str(info.value), str(info.value)
    assert isinstance(info.value, LivarError)
    return info.value


def assert_stratified(labels: np.ndarray, test_labels: np.ndarray, fraction: float) -> None:
    """Each class's test count is floor or ceil of fraction * its count."""
    for c in np.unique(labels):
        quota = fraction * np.count_nonzero(labels == c)
        assert np.floor(quota) <= np.count_nonzero(test_labels == c) <= np.ceil(quota)


def test_registry_lists_all_datasets_with_descriptions():
    assert available_datasets() == REGISTERED
    for name in REGISTERED:
        info = D.DATASETS[name]
        assert info.description and info.obtain and callable(info.loader)


def test_unknown_dataset_lists_registered_names():
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet-21k")
    for name in REGISTERED:
        assert name in str(info.value)


def test_unknown_option_and_bad_image_size_are_refused():
    with pytest.raises(DatasetError, match="unknown option.*test_fraktion"):
        load_dataset("digits", test_fraktion=0.3)
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DatasetError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_register_dataset_rejects_duplicates():
    with pytest.raises(DatasetError, match="already registered"):
        D.register_dataset("digits", description="x", obtain="y")(lambda root, **kw: None)


def test_module_import_stays_light():
    code = "import livar_merge.federated.datasets, livar_merge.federated.partition"
    assert fresh_imports(code, ("PIL", "pyarrow", "pandas", "sklearn", "datasets")) == []


def test_sources_name_no_hosts_or_urls():
    # how-to-obtain hints describe sources in words; no URL or host name appears in the package
    import re

    files = sorted(Path(D.__file__).parent.rglob("*.py"))
    assert len(files) > 1
    for path in files:
        text = path.read_text()
        assert "://" not in text, path
        pattern = r"\b[a-z0-9-]+\.(org|com|net|io|edu|co)\b"
        assert re.search(pattern, text, re.IGNORECASE) is None, path


def test_missing_data_root_explains_how_to_obtain(tmp_path):
    error = raises_naming(tmp_path / "nowhere", "tiny-imagenet", tmp_path / "nowhere")
    assert "tiny-imagenet-200.zip" in str(error)
    assert "CS231n" in str(error)
    with pytest.raises(DatasetError, match="data_root is required"):
        load_dataset("cub200")
    empty = tmp_path / "empty"
    empty.mkdir()
    error = raises_naming(empty / "cifar-100-python", "cifar100", empty)
    assert "cifar-100-python.tar.gz" in str(error)
    error = raises_naming(empty / "CUB_200_2011", "cub200", empty)
    assert "CUB_200_2011.tgz" in str(error)


def test_in_memory_images_and_subset_keep_kind_classes_channels():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.int64).reshape(5, 3, 2, 2).to(torch.uint8)
    ds = InMemoryImages(images, np.array([0, 1, 2, 1, 0]), ["a", "b", "c"])
    part = subset(ds, np.array([4, 1]))
    assert isinstance(part, InMemoryImages)
    assert part.classes == ["a", "b", "c"] and part.channels == 3
    assert torch.equal(part.images, images[[4, 1]])
    assert part.labels.tolist() == [0, 1]
    image, label = part[-1]
    assert torch.equal(image, images[1]) and label == 1
    with pytest.raises(IndexError):
        part[2]
    with pytest.raises(DatasetError, match="outside"):
        InMemoryImages(images, np.array([0, 1, 3, 1, 0]), ["a", "b", "c"])
    with pytest.raises(DatasetError, match=r"\[0, 5\)"):
        subset(ds, np.array([5]))
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 2, 2) and labels.tolist() == [0, 1, 2, 1, 0]


def test_file_images_subset_and_decode_error(tmp_path):
    write_jpeg(tmp_path / "a.jpg", (10, 20, 30))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    ds = FileImages([tmp_path / "a.jpg", tmp_path / "broken.jpg"], np.array([0, 1]), ["x", "y"])
    part = subset(ds, np.array([0]))
    assert isinstance(part, FileImages) and part.classes == ["x", "y"] and part.channels == 3
    assert_solid(part[0][0], (10, 20, 30))
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[1]


def test_stratified_subsample_is_sorted_proportional_deterministic():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_subsample(labels, 10, seed=3)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert np.array_equal(idx, stratified_subsample(labels, 10, seed=3))
    assert not np.array_equal(idx, stratified_subsample(labels, 10, seed=4))
    odd = stratified_subsample(labels, 7, seed=0)  # quotas 3.5, 2.1, 1.4 -> 4, 2, 1
    assert np.bincount(labels[odd]).tolist() == [4, 2, 1]
    assert np.array_equal(stratified_subsample(labels, 100, seed=0), np.arange(100))
    with pytest.raises(DatasetError):
        stratified_subsample(labels, 101, seed=0)


@pytest.mark.parametrize("use_parent", [True, False])
def test_tiny_imagenet_folder_layout(tmp_path, use_parent):
    folder = write_tiny_folder(tmp_path)
    ds = load_dataset("tiny-imagenet", tmp_path if use_parent else folder)
    assert ds.source == str(folder.resolve())
    assert ds.classes == ["Egyptian cat", "goldfish, Carassius auratus", "n04067472"]
    assert ds.num_classes == 3 and ds.channels == 3
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # wnids.txt order
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(12):
        image, label = ds.train[i]
        assert_solid(image, colour(label, i % 4))
    image, label = ds.test[3]
    assert label == 1
    assert_solid(image, colour(1, 6))


def test_tiny_imagenet_resizes_at_getitem(tmp_path):
    write_tiny_folder(tmp_path)
    ds = load_dataset("tiny-imagenet", tmp_path, image_size=8)
    image, label = ds.train[5]
    assert image.shape == (3, 8, 8)
    assert_solid(image, colour(label, 1), hw=(8, 8))


def test_tiny_imagenet_unknown_wnid_names_file_and_line(tmp_path):
    folder = write_tiny_folder(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("n01443537", "n00000042")
    annotations.write_text("".join(lines))
    error = raises_naming(annotations, "tiny-imagenet", tmp_path)
    assert "line 3" in str(error) and "n00000042" in str(error)


def test_tiny_imagenet_empty_class_and_missing_annotations(tmp_path):
    folder = write_tiny_folder(tmp_path)
    images = folder / "train" / "n01443537" / "images"
    for path in images.iterdir():
        path.unlink()
    raises_naming(images, "tiny-imagenet", tmp_path)
    other = write_tiny_folder(tmp_path / "b")
    (other / "val" / "val_annotations.txt").unlink()
    raises_naming(other / "val" / "val_annotations.txt", "tiny-imagenet", other)


def test_tiny_imagenet_parquet_layout_round_trips_pixels(tmp_path):
    train_labels = [0, 2, 1, 1, 0, 2, 2]
    arrays = write_tiny_parquet(tmp_path, train_labels, [1, 0, 2])
    ds = load_dataset("tiny-imagenet", tmp_path)
    assert ds.classes == ["0", "1", "2"]  # no class file beside: label index strings
    assert ds.source == str((tmp_path / "data").resolve())
    assert ds.train.labels.tolist() == train_labels and ds.test.labels.tolist() == [1, 0, 2]
    for split, data in ((ds.train, arrays["train"]), (ds.test, arrays["valid"])):
        for i in range(len(split)):
            image, label = split[i]
            assert torch.equal(image, torch.from_numpy(data[i]).permute(2, 0, 1))  # lossless PNG
            assert label == split.labels[i]
    resized = load_dataset("tiny-imagenet", tmp_path / "data", image_size=4)
    assert resized.train[0][0].shape == (3, 4, 4)
    part = subset(ds.train, np.array([3, 0]))
    assert part.labels.tolist() == [1, 0]
    assert torch.equal(part[0][0], torch.from_numpy(arrays["train"][3]).permute(2, 0, 1))


def test_tiny_imagenet_parquet_class_file_and_label_range(tmp_path):
    write_tiny_parquet(tmp_path, [0, 1, 2, 3], [3, 2])
    (tmp_path / "wnids.txt").write_text("n01\nn02\nn03\nn04\n")
    ds = load_dataset("tiny-imagenet", tmp_path)
    assert ds.classes == ["n01", "n02", "n03", "n04"] and ds.num_classes == 4
    (tmp_path / "wnids.txt").unlink()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")  # only 3 classes: label 3 is out of range
    error = raises_naming(
        tmp_path / "data" / "train-00001-of-00002.parquet", "tiny-imagenet", tmp_path
    )
    assert "row 1" in str(error) and "label" in str(error)


def test_tiny_imagenet_parquet_missing_valid_and_bad_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tiny_parquet(tmp_path, [0, 1], [0])
    (tmp_path / "data" / "valid-00000-of-00001.parquet").unlink()
    raises_naming(tmp_path / "data" / "valid-*.parquet", "tiny-imagenet", tmp_path)
    pq.write_table(
        pa.table({"img": [b"x"], "label": [0]}), tmp_path / "data" / "valid-00000-of-00001.parquet"
    )
    error = raises_naming(
        tmp_path / "data" / "valid-00000-of-00001.parquet", "tiny-imagenet", tmp_path
    )
    assert "image" in str(error)


@pytest.mark.parametrize(("protocol", "names_as_bytes"), [(5, False), (2, True)])
def test_cifar100_round_trips_pixels_exactly(tmp_path, protocol, names_as_bytes):
    folder, batches, names = write_cifar(tmp_path, protocol, names_as_bytes)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.source == str(folder.resolve()) and ds.classes == names
    assert ds.num_classes == 100 and ds.channels == 3
    assert len(ds.train) == 7 and len(ds.test) == 3
    for split, batch in ((ds.train, batches["train"]), (ds.test, batches["test"])):
        assert split.labels.tolist() == batch[b"fine_labels"]
        expected = torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32))
        assert torch.equal(split.images, expected)
        # CIFAR rows are 1024 R, 1024 G, 1024 B values, each 32x32 row-major
        assert split[0][0][1, 2, 5].item() == batch[b"data"][0, 1024 + 2 * 32 + 5]


def test_cifar100_image_size_matches_torchvision_resize(tmp_path):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    _, batches, _ = write_cifar(tmp_path / "x")
    ds = load_dataset("cifar100", tmp_path / "x" / "cifar-100-python", image_size=20)
    assert isinstance(ds.train, InMemoryImages) and ds.train.images.shape == (7, 3, 20, 20)
    original = torch.from_numpy(batches["train"][b"data"].reshape(-1, 3, 32, 32))
    reference = resize(original, [20, 20], InterpolationMode.BILINEAR, antialias=True)
    diff = (ds.train.images.to(torch.int16) - reference.to(torch.int16)).abs().max().item()
    assert diff <= 1  # torchvision's uint8 kernel rounds in fixed point


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["train", "meta"])
def test_cifar100_malicious_pickle_is_refused(tmp_path, victim):
    folder, _, _ = write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with (folder / victim).open("wb") as handle:
        pickle.dump({b"data": _Evil(marker), b"fine_labels": []}, handle)
    error = raises_naming(folder / victim, "cifar100", tmp_path)
    assert "system" in str(error) and "refus" in str(error)
    assert not marker.exists()


def test_cifar100_malformed_batches(tmp_path):
    folder, _, _ = write_cifar(tmp_path)
    (folder / "test").unlink()
    raises_naming(folder / "test", "cifar100", tmp_path)
    with (folder / "test").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 100]}, handle)
    error = raises_naming(folder / "test", "cifar100", tmp_path)
    assert "fine_labels" in str(error) and "100" in str(error)
    with (folder / "test").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [1, 2]}, handle)
    raises_naming(folder / "test", "cifar100", tmp_path)
    (folder / "test").write_bytes(b"\x80\x05garbage")
    raises_naming(folder / "test", "cifar100", tmp_path)


@pytest.mark.parametrize("use_parent", [True, False])
def test_imagenet_r_class_folders_and_seeded_stratified_split(tmp_path, use_parent):
    counts = {"n01443537": 10, "n01833805": 5, "n02007558": 5}
    written = class_folders(tmp_path / "imagenet-r", counts)
    root = tmp_path if use_parent else tmp_path / "imagenet-r"
    ds = load_dataset("imagenet-r", root, seed=1)
    assert ds.classes == sorted(counts) and ds.channels == 3
    assert len(ds.train) == 16 and len(ds.test) == 4  # 20 * 0.2
    assert_stratified(np.concatenate([ds.train.labels, ds.test.labels]), ds.test.labels, 0.2)
    assert set(ds.train.paths).isdisjoint(ds.test.paths)
    assert set(ds.train.paths) | set(ds.test.paths) == set(written)
    for split in (ds.train, ds.test):
        for i in range(len(split)):
            image, label = split[i]
            assert (label, written[split.paths[i]][0]) == (label, label)
            assert_solid(image, written[split.paths[i]][1])
    again = load_dataset("imagenet-r", root, seed=1)
    assert again.test.paths == ds.test.paths
    other = [load_dataset("imagenet-r", root, seed=s).test.paths for s in range(2, 6)]
    assert any(paths != ds.test.paths for paths in other)
    bigger = load_dataset("imagenet-r", root, seed=1, test_fraction=0.5, image_size=6)
    assert len(bigger.test) == 10 and bigger.test[0][0].shape == (3, 6, 6)


def test_imagenet_r_empty_class_folder_is_named(tmp_path):
    class_folders(tmp_path / "imagenet-r", {"n01443537": 3})
    (tmp_path / "imagenet-r" / "n09999999").mkdir()
    raises_naming(tmp_path / "imagenet-r" / "n09999999", "imagenet-r", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    error = raises_naming(empty, "imagenet-r", empty)
    assert "Many Faces of Robustness" in str(error)


@pytest.mark.parametrize("layout", ["EuroSAT_RGB", "2750"])
def test_eurosat_layouts_and_split(tmp_path, layout):
    counts = {"AnnualCrop": 5, "Forest": 5, "River": 10}
    written = class_folders(tmp_path / layout, counts)
    ds = load_dataset("eurosat", tmp_path, seed=0, test_fraction=0.4)
    assert ds.classes == ["AnnualCrop", "Forest", "River"] and ds.num_classes == 3
    assert ds.source == str((tmp_path / layout).resolve())
    assert len(ds.train) == 12 and len(ds.test) == 8
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 4]
    image, label = ds.test[0]
    assert label == written[ds.test.paths[0]][0]
    assert_solid(image, written[ds.test.paths[0]][1])
    direct = load_dataset("eurosat", tmp_path / layout, seed=0, test_fraction=0.4)
    assert direct.test.paths == ds.test.paths


def test_eurosat_missing_explains_layout(tmp_path):
    (tmp_path / "EuroSAT_RGB").mkdir()
    error = raises_naming(tmp_path / "EuroSAT_RGB", "eurosat", tmp_path)
    assert "2750" in str(error) and "EuroSAT_RGB.zip" in str(error)


def test_cub200_official_split(tmp_path):
    folder, rows = write_cub(tmp_path)
    ds = load_dataset("cub200", tmp_path)
    assert ds.classes == CUB_CLASSES and ds.source == str(folder.resolve())
    train_rows = [r for r in rows if r[3] == 1]
    test_rows = [r for r in rows if r[3] == 0]
    assert len(ds.train) == len(train_rows) == 4 and len(ds.test) == len(test_rows) == 2
    assert ds.train.labels.tolist() == [r[2] - 1 for r in train_rows]
    assert ds.test.paths == [folder / "images" / r[1] for r in test_rows]
    for split, split_rows in ((ds.train, train_rows), (ds.test, test_rows)):
        for i, (image_id, _, label, _) in enumerate(split_rows):
            assert_solid(split[i][0], colour(label - 1, image_id))
    small = load_dataset("cub200", folder, image_size=5)
    assert small.test[1][0].shape == (3, 5, 5)


def test_cub200_bad_label_and_missing_image(tmp_path):
    folder, _ = write_cub(tmp_path)
    labels_file = folder / "image_class_labels.txt"
    labels_file.write_text(labels_file.read_text().replace("5 2", "5 3"))
    error = raises_naming(labels_file, "cub200", tmp_path)
    assert "image id 5" in str(error)
    labels_file.write_text(labels_file.read_text().replace("5 3", "5 2"))
    missing = folder / "images" / CUB_CLASSES[0] / "bird_0002.jpg"
    missing.unlink()
    raises_naming(missing, "cub200", tmp_path)
    write_jpeg(missing, (0, 0, 0))
    split = folder / "train_test_split.txt"
    split.write_text(split.read_text().replace("2 1", "2 oops"))
    error = raises_naming(folder / "train_test_split.txt", "cub200", tmp_path)
    assert "line 2" in str(error)


@pytest.mark.parametrize("gz_train", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path, gz_train):
    arrays = write_fashion(tmp_path, gz_train=gz_train)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.classes == FASHION_MNIST_CLASSES and ds.channels == 1
    assert ds.source == str(tmp_path.resolve())
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert ds.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.train[0][0].shape == (1, 7, 5)
    resized = load_dataset("fashion-mnist", tmp_path, image_size=8)
    assert resized.train.images.shape == (6, 1, 8, 8) and resized.test[0][0].shape == (1, 8, 8)


def test_fashion_mnist_torchvision_raw_folder(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", tmp_path)
    assert len(ds.train) == 6 and len(ds.test) == 4


def _rewrite(path: Path, transform) -> None:
    data = path.read_bytes()
    gz = path.suffix == ".gz"
    raw = gzip.decompress(data) if gz else data
    raw = transform(raw)
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize(
    ("file_name", "transform", "fragment"),
    [
        ("t10k-images-idx3-ubyte", lambda b: b[:-3], "truncated"),
        ("t10k-images-idx3-ubyte", lambda b: b + b"\0", "trailing"),
        ("t10k-images-idx3-ubyte", lambda b: b[:9], "truncated idx header"),
        ("t10k-images-idx3-ubyte", lambda b: b"\0\0\x08\x01" + b[4:], "magic"),
        ("t10k-labels-idx1-ubyte", lambda b: b"\x01\x08" + b[2:], "magic"),
        ("train-images-idx3-ubyte.gz", lambda b: b[:-1], "truncated"),
        ("train-labels-idx1-ubyte.gz", lambda b: b[:-2] + b"\x0c" + b[-1:], "label 12"),
        ("train-labels-idx1-ubyte.gz", lambda b: b[:-1], "truncated"),
    ],
)
def test_fashion_mnist_malformed_idx(tmp_path, file_name, transform, fragment):
    write_fashion(tmp_path)
    _rewrite(tmp_path / file_name, transform)
    error = raises_naming(tmp_path / file_name, "fashion-mnist", tmp_path)
    assert fragment in str(error)


def test_fashion_mnist_count_mismatch_broken_gzip_and_missing(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    error = raises_naming(tmp_path / "t10k-labels-idx1-ubyte", "fashion-mnist", tmp_path)
    assert "4 images" in str(error)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    raises_naming(gz, "fashion-mnist", tmp_path)
    gz.unlink()
    error = raises_naming(tmp_path / "train-images-idx3-ubyte", "fashion-mnist", tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(error)


def test_read_idx_parses_header_dims():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = idx_bytes(array)
    assert blob[:4] == b"\x00\x00\x08\x03" and int.from_bytes(blob[4:8], "big") == 2


def test_digits_real():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", seed=0)
    assert ds.source == "sklearn" and ds.channels == 1 and ds.num_classes == 10
    assert len(ds.train) + len(ds.test) == 1797
    assert len(ds.test) == 359  # round(1797 * 0.2)
    assert ds.train[0][0].shape == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    bunch = load_digits()
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    all_images = torch.cat([ds.train.images, ds.test.images])[:, 0].numpy()
    all_labels = np.concatenate([ds.train.labels, ds.test.labels])
    order = np.argsort(np.concatenate(stratified_split(bunch.target, 0.2, 0)))
    assert np.array_equal(all_images[order], expected)
    assert np.array_equal(all_labels[order], bunch.target)
    assert_stratified(bunch.target, ds.test.labels, 0.2)
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.test.images, ds.test.images)
    assert not torch.equal(load_dataset("digits", seed=1).test.images, ds.test.images)
    assert load_dataset("digits", image_size=16).train.images.shape[1:] == (1, 16, 16)


def test_fashion_mnist_real():
    root = FASHION_MNIST_DEFAULT_ROOT
    if not root.is_dir():
        pytest.skip(f"{root} absent (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(root.resolve())
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.num_classes == 10 and ds.channels == 1
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.images.float().mean().item() > 50  # real pictures, not zeros


def test_synthetic_is_deterministic_sized_and_learnable():
    ds = load_dataset("synthetic", seed=5)
    assert ds.source == "generated" and ds.channels == 3 and ds.num_classes == 10
    assert ds.train.images.shape == (1000, 3, 32, 32) and ds.test.images.shape == (200, 3, 32, 32)
    assert np.bincount(ds.train.labels).tolist() == [100] * 10
    again = load_dataset("synthetic", seed=5)
    assert torch.equal(again.train.images, ds.train.images)
    assert torch.equal(again.test.images, ds.test.images)
    assert not torch.equal(load_dataset("synthetic", seed=6).train.images, ds.train.images)
    # learnable: a nearest-class-mean classifier fit on train generalises to test
    x = ds.train.images.reshape(1000, -1).float()
    means = torch.stack([x[torch.from_numpy(ds.train.labels == k)].mean(0) for k in range(10)])
    pred = torch.cdist(ds.test.images.reshape(200, -1).float(), means).argmin(1).numpy()
    assert (pred == ds.test.labels).mean() > 0.9
    assert not torch.equal(ds.train.images[0], ds.train.images[1])  # per-sample noise/shift


def test_synthetic_options():
    ds = load_dataset(
        "synthetic",
        seed=0,
        image_size=12,
        num_classes=4,
        channels=1,
        train_per_class=3,
        test_per_class=2,
    )
    assert ds.classes == ["class_0", "class_1", "class_2", "class_3"] and ds.channels == 1
    assert ds.train.images.shape == (12, 1, 12, 12) and ds.test.images.shape == (8, 1, 12, 12)
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("synthetic", channels=2)


def test_builtin_dataset_names_are_the_registry_and_checked_without_torch():
    """A wrong --dataset / --proxy fails in validation (no torch, no loaders imported); the
    torch-free name list equals what the sources register, and a dataset registered at run
    time passes too."""
    from livar_merge.errors import DatasetError
    from livar_merge.federated.config import BUILTIN_DATASETS, check_dataset_name
    from livar_merge.federated.datasets import available_datasets, register_dataset
    from livar_merge.federated.datasets.registry import DATASETS

    assert sorted(BUILTIN_DATASETS) == sorted(available_datasets())
    with pytest.raises(DatasetError, match="option proxy: unknown dataset 'nope'"):
        check_dataset_name("nope", "proxy")

    @register_dataset("my-own", description="test", obtain="none")
    def _load(root, *, image_size, seed):  # pragma: no cover - never loaded
        raise AssertionError

    try:
        check_dataset_name("my-own")
    finally:
        DATASETS.pop("my-own")
