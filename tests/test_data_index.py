"""Dataset indexes for every supported layout, built from tiny fake trees in tmp_path."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import DatasetIndex, UnreadableSample, build_index


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def _imagefolder(root: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            for i in range(n):
                _jpeg(root / split / c / f"{i}.jpg", colour)
    _jpeg(root / "train" / "dog" / "extra" / "deep.JPEG", (10, 200, 10))  # nested, upper case
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "._0.jpg").write_bytes(b"macOS resource fork")


def test_imagefolder_index(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "ds")
    spec = DataSpec(dataset="imagefolder", root=str(tmp_path / "ds"))
    train = build_index(spec, "train")
    assert train.classes == ["cat", "dog"]
    assert len(train) == 7 and train.labels.dtype == np.int64
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert train.files is not None and train.files[3].decode() == "train/dog/0.jpg"
    assert train.files[6].decode() == "train/dog/extra/deep.JPEG"
    img = train.load(4)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert np.abs(np.asarray(img)[5, 5].astype(int) - [10, 200, 10]).max() < 8
    assert train.samples[0] == str(tmp_path / "ds" / "train" / "cat" / "0.jpg")
    val = build_index(spec, "val")
    assert len(val) == 4 and val.classes == train.classes and val.split == "val"
    assert val.fingerprint != train.fingerprint
    assert train.bad == []


def test_imagefolder_classes_follow_the_train_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _imagefolder(root)
    shutil.rmtree(root / "val" / "cat")
    val = build_index(DataSpec(dataset="imagefolder", root=str(root)), "val")
    assert val.classes == ["cat", "dog"] and set(val.labels.tolist()) == {1}
    _jpeg(root / "val" / "cow" / "0.jpg", (1, 2, 3))
    with pytest.raises(ConfigError, match="unknown class folder 'cow'"):
        build_index(DataSpec(dataset="imagefolder", root=str(root)), "val")


def test_fingerprint_stable_across_cwd_and_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _imagefolder(tmp_path / "a" / "ds")
    first = build_index(DataSpec(dataset="imagefolder", root=str(tmp_path / "a" / "ds")), "train")
    shutil.copytree(tmp_path / "a" / "ds", tmp_path / "b" / "ds")
    monkeypatch.chdir(tmp_path / "b")
    moved = build_index(DataSpec(dataset="imagefolder", root="ds"), "train")
    assert moved.root == str(Path(tmp_path / "b" / "ds"))
    assert moved.fingerprint == first.fingerprint
    _jpeg(tmp_path / "b" / "ds" / "train" / "cat" / "0.jpg", (1, 2, 3), size=(40, 30))
    changed = build_index(DataSpec(dataset="imagefolder", root="ds"), "train")
    assert changed.fingerprint != first.fingerprint


def test_missing_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path / "nope")):
        build_index(DataSpec(dataset="imagefolder", root=str(tmp_path / "nope")), "train")
    _imagefolder(tmp_path / "ds")
    with pytest.raises(ConfigError, match=str(tmp_path / "ds" / "test")):
        build_index(DataSpec(dataset="imagefolder", root=str(tmp_path / "ds")), "test")
    with pytest.raises(ConfigError, match="make_demo_data"):
        build_index(DataSpec(dataset="demo", root=str(tmp_path / "nodemo")), "train")
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        build_index(DataSpec(dataset="cifar11", root=str(tmp_path)), "train")
    with pytest.raises(ConfigError, match="num_classes"):
        build_index(
            DataSpec(dataset="imagefolder", root=str(tmp_path / "ds"), num_classes=5), "train"
        )


def _tiny(root: Path) -> None:
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("n09\nn01\n")  # file order, not sorted order
    for w, colour in (("n09", (250, 0, 0)), ("n01", (0, 0, 250))):
        for i in range(2):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", colour, (64, 64))
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    lines = []
    for i, w in enumerate(["n01", "n09", "n01"]):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", (0, 0, 0), (64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t5\t30\t40")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _jpeg(root / "test" / "images" / "test_0.JPEG", (0, 0, 0), (64, 64))


def test_tiny_imagenet_index(tmp_path: Path) -> None:
    _tiny(tmp_path / "tiny")
    spec = DataSpec(dataset="tiny_imagenet", root=str(tmp_path / "tiny"))
    train = build_index(spec, "train")
    assert train.classes == ["n09", "n01"]
    assert train.labels.tolist() == [1, 1, 0, 0]  # folders listed in sorted order, labels by wnids
    assert np.asarray(train.load(0))[0, 0].tolist()[2] > 200  # n01 is blue
    val = build_index(spec, "val")
    assert val.labels.tolist() == [1, 0, 1]
    assert [f.decode() for f in val.files] == [f"val/images/val_{i}.JPEG" for i in range(3)]
    with pytest.raises(ConfigError, match="no labels"):
        build_index(spec, "test")


def test_tiny_imagenet_bad_annotations(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    _tiny(root)
    spec = DataSpec(dataset="tiny_imagenet", root=str(root))
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="line 4.*val_9.JPEG"):
        build_index(spec, "val")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn05\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="line 1.*'n05'"):
        build_index(spec, "val")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(ConfigError, match="val_annotations.txt"):
        build_index(spec, "val")
    (root / "wnids.txt").unlink()
    with pytest.raises(ConfigError, match=str(root / "wnids.txt")):
        build_index(spec, "train")


def _cifar_data(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _cifar10(folder: Path, byte_keys: bool = False) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for s, name in enumerate(names):
        data, labels = _cifar_data(4, s)
        with open(folder / name, "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels}, f, protocol=2)
        written[name] = (data, labels)
    meta = {key("label_names"): [f"c{i}".encode() for i in range(10)]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return written


@pytest.mark.parametrize("byte_keys", [False, True])
def test_cifar10_index(tmp_path: Path, byte_keys: bool) -> None:
    written = _cifar10(tmp_path / "cifar-10-batches-py", byte_keys)
    spec = DataSpec(dataset="cifar10", root=str(tmp_path))
    train = build_index(spec, "train")
    assert len(train) == 20 and train.classes[3] == "c3"
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data = written["data_batch_2"][0]
    img = np.asarray(train.load(5))  # batch 2, image 1
    assert img.shape == (32, 32, 3)
    assert img[0, 1, 0] == data[1, 1] and img[2, 3, 1] == data[1, 1024 + 2 * 32 + 3]
    assert img[31, 31, 2] == data[1, 3071]
    test = build_index(spec, "test")
    assert len(test) == 4 and test.sizes is not None and test.sizes[0].tolist() == [32, 32]
    assert build_index(spec, "train").fingerprint == train.fingerprint != test.fingerprint


def test_cifar_missing_file_and_unsafe_pickle(tmp_path: Path) -> None:
    _cifar10(tmp_path / "cifar-10-batches-py")
    spec = DataSpec(dataset="cifar10", root=str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="'data_batch_3'.*cifar-10-batches-py/data_batch_3"):
        build_index(spec, "train")
    with pytest.raises(ConfigError, match="train\\|test"):
        build_index(spec, "val")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": os.getcwd}, f)  # a pickle that would call code
    with pytest.raises(ConfigError, match="refusing to load"):
        build_index(spec, "test")


def test_cifar100_index(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        data, labels = _cifar_data(n, n)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    index = build_index(DataSpec(dataset="cifar100", root=str(tmp_path)), "train")
    assert len(index) == 6 and index.num_classes == 100 and index.classes[99] == "f99"
    assert index.labels.tolist() == _cifar_data(6, 6)[1]


def test_stl10_index_column_major(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)  # N, H, W, C
    images.transpose(0, 3, 2, 1).tofile(folder / "train_X.bin")  # stored N, C, W, H
    np.array([1, 10, 4], dtype=np.uint8).tofile(folder / "train_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    index = build_index(DataSpec(dataset="stl10", root=str(tmp_path)), "train")
    assert index.labels.tolist() == [0, 9, 3] and index.classes[9] == "k9"
    assert np.array_equal(np.asarray(index.load(1)), images[1])
    with pytest.raises(ConfigError, match="test_X.bin"):
        build_index(DataSpec(dataset="stl10", root=str(tmp_path)), "test")
    np.array([1, 2], dtype=np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(ConfigError, match="expected 2 images"):
        build_index(DataSpec(dataset="stl10", root=str(tmp_path)), "train")


def test_synthetic_index() -> None:
    spec = DataSpec(dataset="synthetic", synthetic_size=40, augment="cifar")
    a, b = build_index(spec, "train"), build_index(spec, "train")
    assert a.fingerprint == b.fingerprint and np.array_equal(a.array, b.array)
    assert build_index(spec, "val").fingerprint != a.fingerprint
    assert a.array is not None and a.array.shape == (40, 32, 32, 3) and a.num_classes == 10
    assert np.bincount(a.labels).tolist() == [4] * 10
    big = build_index(
        DataSpec(dataset="synthetic", synthetic_size=6, augment="imagenet", num_classes=3), "train"
    )
    assert big.load(0).size == (300, 260) and big.num_classes == 3


def test_index_rejects_inconsistent_contents() -> None:
    with pytest.raises(ValueError, match="labels in 0..1"):
        DatasetIndex(
            "x", "/r", "train", ["a", "b"], np.array([0, 2]), array=np.zeros((2, 4, 4, 3), np.uint8)
        )
    with pytest.raises(ValueError, match="3 samples but 2 labels"):
        DatasetIndex("x", "/r", "train", ["a"], np.zeros(2), array=np.zeros((3, 4, 4, 3), np.uint8))


def test_ram_cache_decodes_each_file_once_within_its_budget(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "ds")
    spec = DataSpec(dataset="imagefolder", root=str(tmp_path / "ds"))
    plain = build_index(DataSpec(dataset="imagefolder", root=str(tmp_path / "ds"), ram_cache_mb=0),
                        "train")
    kept = build_index(spec, "train")
    assert kept.ram_cache_bytes == 512 << 20 and plain.ram_cache_bytes == 0
    first = [np.asarray(kept.load(i)) for i in range(len(kept))]
    for i in range(len(kept)):  # the kept images, from memory, are what the files decode to
        os.remove(kept.path(i))
        assert np.array_equal(np.asarray(kept.load(i)), first[i])
        with pytest.raises(UnreadableSample, match="No such file"):
            plain.load(i)
    changed = kept.load(0)
    changed.paste((0, 0, 0), (0, 0, 12, 10))  # a caller's change does not reach the kept image
    assert np.array_equal(np.asarray(kept.load(0)), first[0])


def test_ram_cache_keeps_no_more_than_its_budget(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "ds")
    index = build_index(DataSpec(dataset="imagefolder", root=str(tmp_path / "ds")), "train")
    index.ram_cache_bytes = 2 * 12 * 10 * 3  # room for two 12×10 RGB images
    for i in range(len(index)):
        index.load(i)
    os.remove(index.path(0))
    os.remove(index.path(2))
    index.load(0)  # kept
    with pytest.raises(Exception, match="No such file"):
        index.load(2)  # decoded, but over the budget
