"""Readers for datasets held in memory as uint8 N×H×W×3: CIFAR-10/100, STL-10, synthetic.

CIFAR files are Python pickles (the "python version" of the datasets); they are read with an
unpickler that only builds numpy arrays and plain containers, so a dataset file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.index import DATASETS, DatasetIndex, require, split_key

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}

_SAFE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy < 2 (the CIFAR files)
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        raw = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ConfigError(f"data: expected a CIFAR python pickle at {path}, found: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"data: expected a dict in {path}, found {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _field(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise ConfigError(f"data: expected key {key!r} in {path}, found keys {sorted(d)}")
    return d[key]


def cifar_index(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    """CIFAR-10 (cifar-10-batches-py/) or CIFAR-100 (cifar-100-python/) under ``root``;
    ``root`` may also be that folder itself. Splits: train, test."""
    layout = _CIFAR[spec.dataset]
    require(root, f"the {spec.dataset} root (holding {layout['folder']}/)")
    folder = root / layout["folder"]
    if not folder.is_dir() and (root / layout["meta"]).exists():
        folder = root
    if split not in ("train", "test"):
        raise ConfigError(f"{split_key(spec, split)}: {spec.dataset} has splits train|test, "
                          f"found split {split!r}")
    meta_path = require(folder / layout["meta"], f"the {spec.dataset} file {layout['meta']!r}")
    classes = [_text(c) for c in _field(_load_pickle(meta_path), layout["names"], meta_path)]
    images, labels = [], []
    for name in layout[split]:
        path = require(folder / name, f"the {spec.dataset} {split} file {name!r}")
        d = _load_pickle(path)
        data = np.asarray(_field(d, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ConfigError(
                f"data: expected 'data' of shape (N, 3072) in {path}, found {data.shape}"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(_field(d, layout["labels"], path), dtype=np.int64))
        if len(labels[-1]) != len(data):
            raise ConfigError(f"data: {path} holds {len(data)} images but {len(labels[-1])} labels")
    return DatasetIndex(
        kind=spec.dataset,
        root=str(root),
        split=split,
        classes=classes,
        labels=np.concatenate(labels),
        array=np.ascontiguousarray(np.concatenate(images)),
    )


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


DATASETS.register("cifar10")(cifar_index)
DATASETS.register("cifar100")(cifar_index)


@DATASETS.register("stl10")
def stl10_index(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    """STL-10 binaries: stl10_binary/{split}_X.bin (uint8 N×3×96×96, column-major images),
    {split}_y.bin (labels 1..10, made 0..9), class_names.txt. Splits: train, test."""
    require(root, "the STL-10 root (holding stl10_binary/)")
    folder = root / "stl10_binary"
    if not folder.is_dir() and (root / "class_names.txt").exists():
        folder = root
    if split not in ("train", "test"):
        raise ConfigError(f"{split_key(spec, split)}: stl10 has labelled splits train|test, "
                          f"found split {split!r}")
    names = require(folder / "class_names.txt", "the STL-10 file 'class_names.txt'")
    classes = [c.strip() for c in names.read_text().splitlines() if c.strip()]
    x_path = require(folder / f"{split}_X.bin", f"the STL-10 file '{split}_X.bin'")
    y_path = require(folder / f"{split}_y.bin", f"the STL-10 file '{split}_y.bin'")
    raw = np.fromfile(x_path, dtype=np.uint8)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    per_image = 3 * 96 * 96
    if raw.size != len(labels) * per_image:
        raise ConfigError(
            f"data: expected {len(labels)} images of {per_image} bytes in {x_path} (one per label "
            f"in {y_path}), found {raw.size} bytes"
        )
    # Each channel is stored column by column: raw[n, c, x, y] is pixel (y, x) of channel c.
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    return DatasetIndex(
        kind="stl10",
        root=str(root),
        split=split,
        classes=classes,
        labels=labels,
        array=np.ascontiguousarray(images),
    )


SYNTHETIC_SHAPES = {"cifar": (32, 32), "tiny_imagenet": (64, 64), "imagenet": (300, 260)}
"""(width, height) of synthetic images per ``data.augment``; ``none`` uses image_size."""


@DATASETS.register("synthetic")
def synthetic_index(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    """``spec.synthetic_size`` deterministic random images per split, for runs without data.

    Each class has a mean colour (the same in every split) and every image is that colour plus
    noise, so a model can learn something. The pixels depend only on the split name, the class
    count and the shape: the same on any machine. ``root`` is not used.
    """
    n = spec.synthetic_size
    num_classes = spec.num_classes or 10
    if n <= 0:
        raise ConfigError(f"data.synthetic_size: expected a positive count, found {n}")
    w, h = SYNTHETIC_SHAPES.get(spec.augment, (spec.image_size, spec.image_size))
    rng = np.random.default_rng([zlib.crc32(split.encode("utf-8")), n, num_classes, w, h])
    labels = rng.permutation(np.arange(n) % num_classes)
    colours = np.random.default_rng(1234).integers(32, 224, size=(num_classes, 3))
    noise = rng.integers(-48, 49, size=(n, h, w, 3), dtype=np.int16)
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return DatasetIndex(
        kind="synthetic",
        root="<synthetic>",
        split=split,
        classes=[f"class_{c}" for c in range(num_classes)],
        labels=labels,
        array=images,
    )
