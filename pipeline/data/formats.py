"""Readers for datasets stored as image files: ImageFolder (ImageNet layout), demo, Tiny-ImageNet.

The listing is one ``os.scandir`` walk per split (ImageNet's train split has 1.28M files):
directory entries give names and types without a stat call, and one stat per image gives the
size that goes into the fingerprint. Names starting with a dot (``.DS_Store``, macOS ``._x.jpg``
resource forks) are skipped. Files are ordered by class, then by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.index import DATASETS, DatasetIndex, require, split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_images(top: Path) -> list[tuple[str, int]]:
    """(path relative to ``top`` with '/' separators, size in bytes) of every image below it."""
    found: list[tuple[str, int]] = []
    stack = [("", str(top))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append((f"{rel}{entry.name}/", entry.path))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.append((rel + entry.name, entry.stat().st_size))
    found.sort()
    return found


def class_dirs(top: Path) -> list[str]:
    """The sorted names of the sub-directories of ``top`` (the class folders)."""
    with os.scandir(top) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _index_from_lists(
    kind: str, root: Path, split: str, classes: list[str], rows: list[tuple[str, int, int]]
) -> DatasetIndex:
    """An index from (path relative to root, size, label) rows."""
    files = np.array([r[0].encode("utf-8") for r in rows], dtype=np.bytes_)
    if not rows:
        files = np.zeros(0, dtype="S1")
    return DatasetIndex(
        kind=kind,
        root=str(root),
        split=split,
        classes=classes,
        labels=np.array([r[2] for r in rows], dtype=np.int64),
        files=files,
        file_sizes=np.array([r[1] for r in rows], dtype=np.int64),
    )


def _class_folder_rows(
    root: Path, split: str, classes: list[str], where: str
) -> list[tuple[str, int, int]]:
    """Rows for root/<split>/<class>/**/image; every folder must be a known class."""
    split_dir = root / split
    label_of = {c: i for i, c in enumerate(classes)}
    rows: list[tuple[str, int, int]] = []
    for name in class_dirs(split_dir):
        if name not in label_of:
            raise ConfigError(
                f"data: expected class folders of {where} in {split_dir}, found an unknown "
                f"class folder {name!r}"
            )
        for rel, size in scan_images(split_dir / name):
            rows.append((f"{split}/{name}/{rel}", size, label_of[name]))
    return rows


def imagefolder_index(
    spec: DataSpec, split: str, root: Path, kind: str = "imagefolder"
) -> DatasetIndex:
    """root/<split>/<class>/*.jpg. Class names (sorted) come from the training split's folders,
    so every split of a dataset numbers classes alike; another split may lack some classes."""
    hint = " (make it with: python tools/make_demo_data.py)" if kind == "demo" else ""
    require(root, f"the dataset root of {kind}{hint}")
    split_dir = require(root / split, f"the {split!r} split folder (root/<split>/<class>/...)",
                        split_key(spec, split))
    train_dir = root / spec.train_split
    classes = class_dirs(train_dir if train_dir.is_dir() else split_dir)
    if not classes:
        raise ConfigError(f"data: expected class folders in {split_dir}, found none")
    rows = _class_folder_rows(root, split, classes, f"{spec.train_split} ({train_dir})")
    return _index_from_lists(kind, root, split, classes, rows)


@DATASETS.register("imagefolder")
def _imagefolder(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    return imagefolder_index(spec, split, root)


@DATASETS.register("demo")
def _demo(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    return imagefolder_index(spec, split, root, kind="demo")


@DATASETS.register("tiny_imagenet")
def tiny_imagenet_index(spec: DataSpec, split: str, root: Path) -> DatasetIndex:
    """Tiny-ImageNet-200 as distributed: wnids.txt (class order), train/<wnid>/images/*.JPEG,
    val/images/*.JPEG labelled by val/val_annotations.txt (file<TAB>wnid<TAB>box...)."""
    require(root, "the Tiny-ImageNet root (holding wnids.txt, train/, val/)")
    wnids_file = require(root / "wnids.txt", "the class list wnids.txt")
    classes = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data: expected distinct wnids in {wnids_file}, found duplicates")
    if split == "test":
        raise ConfigError(f"data: the Tiny-ImageNet test split at {root / 'test'} has no labels")
    split_dir = require(root / split, f"the Tiny-ImageNet {split!r} split folder",
                        split_key(spec, split))
    annotations = split_dir / f"{split}_annotations.txt"
    if split != spec.train_split and (annotations.exists() or (split_dir / "images").is_dir()):
        # The distributed layout: split/images/*.JPEG labelled by the annotations file.
        require(annotations, f"the {split} labels file {annotations.name}")
        rows = _annotated_rows(root, split, classes, annotations)
    else:  # split/<wnid>/**/*.JPEG (the train layout, or a val split sorted into folders)
        rows = _class_folder_rows(root, split, classes, f"wnids.txt ({wnids_file})")
    return _index_from_lists("tiny_imagenet", root, split, classes, rows)


def _annotated_rows(
    root: Path, split: str, classes: list[str], annotations: Path
) -> list[tuple[str, int, int]]:
    images_dir = require(root / split / "images", f"the {split} image folder")
    sizes = dict(scan_images(images_dir))
    label_of = {c: i for i, c in enumerate(classes)}
    rows: list[tuple[str, int, int]] = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ConfigError(
                f"data: {annotations} line {line_no}: expected 'file<TAB>wnid...', found {line!r}"
            )
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in label_of:
            raise ConfigError(
                f"data: {annotations} line {line_no}: expected a wnid of wnids.txt, found {wnid!r}"
            )
        if name not in sizes:
            raise ConfigError(
                f"data: {annotations} line {line_no}: expected the image {images_dir / name}, "
                "found no such file"
            )
        rows.append((f"{split}/images/{name}", sizes[name], label_of[wnid]))
    rows.sort()
    return rows
