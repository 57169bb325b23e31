"""The dataset index: which samples a split holds, their labels, and how to load one.

An index is either a list of image files (ImageFolder, ImageNet, Tiny-ImageNet, the demo data)
or an in-memory uint8 array N×H×W×3 (CIFAR, STL-10, synthetic). Its ``fingerprint`` (sha256)
identifies the contents independently of the machine and the working directory: file paths
relative to the dataset root and file sizes, or the array bytes, plus labels and class names.
Teacher caches record it and refuse to serve a different dataset.

Readers for each ``data.dataset`` kind live in ``formats.py`` (files) and ``arrays.py``
(arrays) and register themselves in ``DATASETS``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.registry import Registry

# What PIL raises on a file it cannot decode (empty, truncated, not an image, corrupt header).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_error(err: BaseException, path: str) -> str:
    """``<Type>: <message>`` of a decoding error, with the file's path where PIL's message names
    the in-memory buffer it read (``cannot identify image file <_io.BytesIO object at 0x…>``)."""
    return f"{type(err).__name__}: " + _BUFFER_REPR.sub(path, str(err))


class BadSample(NamedTuple):
    """A sample that could not be read: its position in the index, its path, the error."""

    index: int
    path: str
    error: str


class UnreadableSample(Exception):
    """Raised by :meth:`DatasetIndex.load` for a file that PIL cannot decode."""

    def __init__(self, bad: BadSample) -> None:
        super().__init__(f"sample {bad.index} ({bad.path}): cannot read the image: {bad.error}")
        self.bad = bad


@dataclass(eq=False)
class DatasetIndex:
    """The samples of one split of a dataset.

    Exactly one of ``files`` (paths relative to ``root``, utf-8 bytes in a numpy array so that
    forked loader workers do not copy them) or ``array`` (uint8 N×H×W×3) is set.
    """

    kind: str
    root: str
    split: str
    classes: list[str]
    labels: np.ndarray
    files: np.ndarray | None = None
    file_sizes: np.ndarray | None = None  # bytes per file (part of the fingerprint)
    array: np.ndarray | None = None
    sizes: np.ndarray | None = None  # (N, 2) as (width, height) where known
    bad: list[BadSample] = field(default_factory=list)
    # A subset of the split (pipeline/data/subset.py): what was selected, in the fingerprint.
    selection: str = ""
    # Decoded images of a file-based index kept in memory, up to this many bytes of pixels
    # (``data.ram_cache_mb``, set by build_index): a small dataset is decoded once per process,
    # not once per epoch. It does not change what is loaded, so it is not in the fingerprint.
    ram_cache_bytes: int = 0
    _decoded: dict[int, Image.Image] = field(default_factory=dict, repr=False)
    _decoded_bytes: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if (self.files is None) == (self.array is None):
            raise ValueError("a DatasetIndex holds either files or an array, not both or neither")
        count = len(self.files) if self.files is not None else len(self.array)  # type: ignore[arg-type]
        if count != n:
            raise ValueError(f"{self.where}: {count} samples but {n} labels")
        if self.files is not None and (self.file_sizes is None or len(self.file_sizes) != n):
            raise ValueError(f"{self.where}: expected one file size per file")
        if self.array is not None:
            if self.array.dtype != np.uint8 or self.array.ndim != 4 or self.array.shape[3] != 3:
                raise ValueError(f"{self.where}: expected uint8 N×H×W×3, found {self.array.shape}")
            if self.sizes is None:
                h, w = self.array.shape[1:3]
                self.sizes = np.tile(np.array([[w, h]], dtype=np.int64), (n, 1))
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"{self.where}: expected labels in 0..{len(self.classes) - 1}, found "
                f"{self.labels.min()}..{self.labels.max()}"
            )

    @property
    def where(self) -> str:
        subset = f" ({self.selection})" if self.selection else ""
        return f"{self.kind} split {self.split!r}{subset} at {self.root}"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def samples(self) -> list[str] | np.ndarray:
        """Absolute file paths, or the uint8 N×H×W×3 array."""
        if self.array is not None:
            return self.array
        return [self.path(i) for i in range(len(self))]

    def path(self, i: int) -> str:
        """The absolute path of sample ``i`` (``"<array>[i]"`` for in-memory data)."""
        if self.files is None:
            return f"<{self.kind} {self.split} array>[{i}]"
        return os.path.join(self.root, self.files[i].decode("utf-8"))

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image; :class:`UnreadableSample` if it cannot be decoded."""
        if self.array is not None:
            return Image.fromarray(self.array[i])
        kept = self._decoded.get(i)
        if kept is not None:
            return kept.copy()  # a copy: callers may change the image they get
        path = self.path(i)
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except DECODE_ERRORS as err:
            raise UnreadableSample(BadSample(i, path, decode_error(err, path))) from err
        pixels = rgb.width * rgb.height * 3
        if self._decoded_bytes + pixels <= self.ram_cache_bytes:
            self._decoded[i] = rgb
            self._decoded_bytes += pixels
            return rgb.copy()
        return rgb

    def record_bad(self, found: list[BadSample]) -> None:
        """Add samples found unreadable (by a loader) to ``bad``, once each."""
        known = {b.index for b in self.bad}
        for b in found:
            if b.index not in known:
                self.bad.append(b)
                known.add(b.index)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the contents: relative paths and sizes or array bytes, labels, classes, and
        the selection of a subset."""
        h = hashlib.sha256()
        h.update(b"pipeline.data.index v1\n")
        h.update(f"{self.kind}\n{self.split}\n".encode())
        h.update("\n".join(self.classes).encode("utf-8") + b"\n")
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        if self.files is not None:
            assert self.file_sizes is not None
            h.update(b"\n".join(self.files.tolist()))
            h.update(np.ascontiguousarray(self.file_sizes, dtype="<i8").tobytes())
        else:
            assert self.array is not None
            h.update(str(self.array.shape).encode())
            h.update(np.ascontiguousarray(self.array).data)
        if self.selection:  # absent for a whole split, so those fingerprints do not change
            h.update(f"\nselection {self.selection}".encode())
        return h.hexdigest()


Builder = Callable[[DataSpec, str, Path], DatasetIndex]
DATASETS: Registry[Builder] = Registry("dataset")


def resolve_root(root: str) -> Path:
    """A dataset root: absolute as given, relative to the working directory (as config paths)."""
    path = Path(root).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def build_index(spec: DataSpec, split: str) -> DatasetIndex:
    """The index of ``split`` of the dataset ``spec`` describes; ConfigError if it is not there."""
    try:
        builder = DATASETS.get(spec.dataset)
    except KeyError as err:
        raise ConfigError(f"data.dataset: {err.args[0]}") from None
    index = builder(spec, split, resolve_root(spec.root))
    index.ram_cache_bytes = max(int(spec.ram_cache_mb), 0) << 20
    if len(index) == 0:
        raise ConfigError(f"data: {index.where} holds no samples")
    if spec.num_classes and spec.num_classes != index.num_classes:
        raise ConfigError(
            f"data.num_classes: expected the dataset's class count, found {spec.num_classes} "
            f"but {index.where} has {index.num_classes} classes"
        )
    return index


def split_key(spec: DataSpec, split: str) -> str:
    """The config key that named ``split``: ``data.train_split`` or ``data.eval_splits``."""
    return "data.train_split" if split == spec.train_split else "data.eval_splits"


def require(path: Path, what: str, key: str = "data.root") -> Path:
    """``path`` if it exists, else a ConfigError that says what was expected there, under the
    config key to fix (``data.root``, or the split key for a missing split folder), with what
    the parent folder does hold."""
    if not path.exists():
        held = ""
        if path.parent.is_dir():
            names = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            held = f" ({path.parent} holds: {shown or 'nothing'})"
        raise ConfigError(f"{key}: expected {what} at {path}, found nothing there{held}")
    return path
