"""An ImageFolder of awkward files for end-to-end runs: six unreadable files among good ones.

``train/`` holds ``good`` small JPEGs per class plus the odd-but-readable files every backend
must decode (grayscale, CMYK, a PNG named .jpg) and six unreadable ones (two truncated JPEGs,
two empty files, two text files named .jpg); ``val/`` holds a few good JPEGs per class.
Images are 32×32 (the CIFAR pad-crop plan's size), so a step costs little; ``run_config``
writes a config that trains on them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("a", "b", "c")
BAD = ("trunc1.jpg", "trunc2.jpg", "empty1.jpg", "empty2.jpg", "text1.jpg", "text2.jpg")


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], dtype=np.int16)
    pixels = base + rng.integers(-30, 31, (32, 32, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_awkward_folder(root: Path, good: int = 30, val: int = 4) -> Path:
    """Write the folder (``good`` JPEGs per class in train, ``val`` per class in val)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for split, count in (("train", good), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(rng, label).save(folder / f"{i:03d}.jpg", quality=90)
    odd = root / "train" / "a"
    _image(rng, 0).convert("L").save(odd / "gray.jpg", quality=90)
    _image(rng, 0).convert("CMYK").save(odd / "cmyk.jpg", quality=90)
    _image(rng, 0).save(odd / "png_named.jpg", format="PNG")
    buf = io.BytesIO()
    _image(rng, 1).save(buf, format="JPEG", quality=90)
    whole = buf.getvalue()
    for n, name in enumerate(BAD):
        folder = root / "train" / CLASSES[n % 3]
        if name.startswith("trunc"):
            (folder / name).write_bytes(whole[: len(whole) // 2])
        elif name.startswith("empty"):
            (folder / name).write_bytes(b"")
        else:
            (folder / name).write_text("not an image\n")
    return root


def run_config(path: Path, root: Path, *, batch_size: int = 2, extra: str = "") -> Path:
    """A vanilla resnet8 run over the folder: 1 epoch, evaluation on val, no tracking."""
    path.write_text(
        f"name: awkward\ndata:\n  dataset: imagefolder\n  root: {root}\n  eval_splits: [val]\n"
        f"  augment: cifar\n  image_size: 32\n  batch_size: {batch_size}\n"
        "  eval_batch_size: 16\n  workers: 0\nmodel:\n  arch: resnet8\nmethod:\n  name: vanilla\n"
        "optim:\n  epochs: 1\n  milestones: []\ntracking:\n  enabled: false\n"
        "train:\n  progress: false\n  deterministic: true\n" + extra
    )
    return path
