"""Write one split of a dataset index to an FFCV ``.beton`` (``tools/write_ffcv.py``).

Row i holds sample i: ``image``, ``label``, ``index`` (= i). How each image is stored:

- ``original``: a JPEG (RGB or grayscale) whose libjpeg-turbo decoding — the one the loader runs,
  accurate IDCT — equals PIL's pixel for pixel: its file bytes, untouched;
- ``raw``: anything else PIL reads (PNG, CMYK JPEG, ...): PIL's RGB pixels, uncompressed;
- ``reencoded``: with ``max_resolution``, an image whose longer side exceeds it, resized with
  PIL's bilinear filter to that longer side and JPEG-encoded at ``jpeg_quality``;
- unreadable (PIL fails: truncated, empty, not an image): a 1×1 black placeholder, label -1, and
  an entry (index, path, PIL's error) in the sidecar's ``bad`` list.

FFCV's writer runs the conversion in worker processes (fork start method, the Linux default)
with its own tqdm progress bar; each worker also records the original and stored sizes and the
storage mode of its samples in ``<out>.sizes.npy`` and appends unreadable ones to a log that
becomes the sidecar ``<out>.json``. All files are written under temporary names and renamed at
the end, the JSON last: a sidecar's presence means a complete file.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.data.backends import missing_backend
from pipeline.data.ffcv import FORMAT, sidecar
from pipeline.data.index import DECODE_ERRORS, DatasetIndex, decode_error

MODES = {0: "original", 1: "raw", 2: "reencoded", -1: "bad"}
_ORIGINAL, _RAW, _REENCODED, _BAD = 0, 1, 2, -1


class Stored(NamedTuple):
    """What goes into the image field: FFCV mode (0 JPEG, 1 raw), bytes or HWC pixels, size."""

    ffcv_mode: int
    data: np.ndarray
    width: int
    height: int


def _encode(self: Any, destination: Any, image: Stored, malloc: Any) -> None:
    """``RGBImageField.encode`` for a ``Stored`` value: written as given, never re-encoded."""
    destination["mode"] = image.ffcv_mode
    destination["height"], destination["width"] = image.height, image.width
    flat = np.ascontiguousarray(image.data).reshape(-1).view("<u1")
    destination["data_ptr"], storage = malloc(flat.nbytes)
    storage[:] = flat


def prepare(
    index: DatasetIndex, i: int, max_resolution: int, jpeg_quality: int
) -> tuple[Stored, tuple[int, int, int, int, int], str | None]:
    """(stored image, (width, height, stored width, stored height, mode), error or None)."""
    from pipeline.data.ffcv_ops import decode_jpeg

    placeholder = Stored(1, np.zeros((1, 1, 3), dtype=np.uint8), 1, 1)
    data, fmt, mode = b"", None, None
    if index.array is not None:
        rgb = Image.fromarray(index.array[i])
    else:
        try:
            data = Path(index.path(i)).read_bytes()
            if not data:
                raise OSError("empty file")
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode = img.format, img.mode
                rgb = img.convert("RGB")
        except DECODE_ERRORS as err:
            return placeholder, (0, 0, 0, 0, _BAD), decode_error(err, index.path(i))
    w, h = rgb.size
    if max_resolution and max(w, h) > max_resolution:
        ratio = max_resolution / max(w, h)
        small = rgb.resize((max(1, int(w * ratio)), max(1, int(h * ratio))),
                           Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=jpeg_quality)
        jpeg = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        sw, sh = small.size
        return Stored(0, jpeg, sw, sh), (w, h, sw, sh, _REENCODED), None
    pixels = np.asarray(rgb, dtype=np.uint8)
    if fmt == "JPEG" and mode in ("RGB", "L"):
        encoded = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(h * w * 3, dtype=np.uint8)
        if decode_jpeg(encoded, out, w, h) == 0 and np.array_equal(out.reshape(h, w, 3), pixels):
            return Stored(0, encoded, w, h), (w, h, w, h, _ORIGINAL), None
    return Stored(1, pixels, w, h), (w, h, w, h, _RAW), None


class _Source:
    """The indexable FFCV's writer workers read: (image, label, index) of sample i."""

    def __init__(self, index: DatasetIndex, sizes_path: Path, log_path: Path,
                 max_resolution: int, jpeg_quality: int) -> None:
        self.index = index
        self.sizes_path = sizes_path
        self.log_path = log_path
        self.max_resolution = max_resolution
        self.jpeg_quality = jpeg_quality
        self._sizes: np.ndarray | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Stored, int, int]:
        if self._sizes is None or self._pid != os.getpid():  # one map per worker process
            self._sizes, self._pid = np.load(self.sizes_path, mmap_mode="r+"), os.getpid()
        stored, row, error = prepare(self.index, int(i), self.max_resolution, self.jpeg_quality)
        self._sizes[i] = row
        if error is not None:
            line = json.dumps({"index": int(i), "path": self.index.path(int(i)), "error": error})
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
            return stored, -1, int(i)
        return stored, int(self.index.labels[i]), int(i)


def write_beton(index: DatasetIndex, out: str | os.PathLike[str], *, max_resolution: int = 0,
                jpeg_quality: int = 90, workers: int = 0, chunksize: int = 64) -> dict[str, Any]:
    """Convert ``index`` to ``out`` (+ sidecars); returns the sidecar's description."""
    try:
        from pipeline.data.ffcv_ops import decode_jpeg  # first: it imports ffcv thread-safely

        from ffcv.fields import IntField, RGBImageField  # isort: skip
        from ffcv.writer import DatasetWriter  # isort: skip
    except ImportError as err:
        raise missing_backend("ffcv", err) from err
    if multiprocessing.get_start_method(allow_none=False) != "fork":
        raise RuntimeError("write_beton: FFCV's writer workers need the 'fork' start method")
    if not 1 <= jpeg_quality <= 100 or max_resolution < 0:
        raise ValueError(f"expected 1 <= jpeg_quality <= 100 and max_resolution >= 0, found "
                         f"{jpeg_quality} and {max_resolution}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path, sizes_path = sidecar(out)
    tmp_beton = out.with_name(out.name + ".partial")
    tmp_sizes = sizes_path.with_name(sizes_path.name + ".partial.npy")
    log_path = out.with_name(out.name + ".bad.partial")
    for p in (meta_path, tmp_beton, tmp_sizes, log_path):
        p.unlink(missing_ok=True)
    n = len(index)
    sizes = np.lib.format.open_memmap(tmp_sizes, mode="w+", dtype=np.int32, shape=(n, 5))
    sizes[:] = 0
    sizes.flush()
    del sizes
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="JPEG")
    decode_jpeg(np.frombuffer(tiny.getvalue(), np.uint8), np.empty(192, np.uint8), 8, 8)  # jit
    image = RGBImageField(write_mode="jpg")
    image.encode = types.MethodType(_encode, image)  # type stays RGBImageField for readers
    fields = {"image": image, "label": IntField(), "index": IntField()}
    start = time.time()
    writer = DatasetWriter(str(tmp_beton), fields, num_workers=max(1, workers or os.cpu_count()))
    source = _Source(index, tmp_sizes, log_path, max_resolution, jpeg_quality)
    writer.from_indexed_dataset(source, chunksize=chunksize)
    table = np.load(tmp_sizes)
    bad = []
    if log_path.exists():
        bad = sorted((json.loads(line) for line in log_path.read_text().splitlines() if line),
                     key=lambda b: b["index"])
    counts = {name: int((table[:, 4] == m).sum()) for m, name in MODES.items()}
    os.replace(tmp_sizes, sizes_path)
    os.replace(tmp_beton, out)
    log_path.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "fingerprint": index.fingerprint,
        "kind": index.kind,
        "split": index.split,
        "root": index.root,
        "num_samples": n,
        "max_resolution": max_resolution,
        "jpeg_quality": jpeg_quality,
        "counts": counts,
        "bad": bad,
        "beton_bytes": out.stat().st_size,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - start, 1),
    }
    tmp_meta = meta_path.with_name(meta_path.name + ".partial")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return meta
