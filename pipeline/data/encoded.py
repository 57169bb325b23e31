"""Encoded image files for the backends that decode themselves (DALI, nvjpeg): checks and bytes.

Those decoders must never meet a file PIL would reject, and must decode exactly what PIL would
show. ``inspect_encoded`` reads a file and checks it: empty, unidentifiable, a JPEG without its
end-of-image marker after the scan data (``jpeg_problem``), a PNG without IEND — each raises
``UnreadableSample`` with the reason. It returns the bytes with the format, mode and size from
the header. ``read_encoded`` (DALI's feed) passes JPEG and PNG files in RGB or grayscale as they
are and re-encodes anything else (CMYK or palette images, other formats) as a lossless PNG of
PIL's decoding, so DALI decodes what the torchvision backend shows.

The header parse is a third of a feed's time per sample: files already checked are remembered
per dataset index (by size), so later epochs skip it.
"""

from __future__ import annotations

import io
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.data.index import (
    DECODE_ERRORS,
    BadSample,
    DatasetIndex,
    UnreadableSample,
    decode_error,
)

PASS_MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}


class Encoded(NamedTuple):
    """A checked file: its bytes (uint8 view), format and mode from PIL's header parse, size."""

    data: np.ndarray
    format: str
    mode: str
    width: int
    height: int


def jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG file is incomplete, or None: it needs an end-of-image marker after its scan.

    The marker segments are walked to the first start-of-scan, so an embedded EXIF thumbnail's
    own end marker (inside APP1, before the scan) does not count.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            if data.rfind(b"\xff\xd9", pos + 2 + length) < 0:
                return "image file is truncated (no JPEG end-of-image marker after the scan)"
            return None
        pos += 2 + length
    return "image file is truncated (no JPEG scan data)"


# Per dataset index: sample → (format, mode, width, height) of files already checked.
_CHECKED: weakref.WeakKeyDictionary[DatasetIndex, dict[int, tuple[str, str, int, int]]] = (
    weakref.WeakKeyDictionary()
)


def inspect_encoded(index: DatasetIndex, i: int) -> Encoded:
    """The bytes of sample ``i``'s file after the checks of the module docstring."""
    path = index.path(i)
    checked = _CHECKED.setdefault(index, {})

    def bad(error: str) -> UnreadableSample:
        return UnreadableSample(BadSample(i, path, error))

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise bad(f"{type(err).__name__}: {err}") from err
    if not data:
        raise bad("empty file")
    array = np.frombuffer(data, dtype=np.uint8)
    known = checked.get(i)
    if known is not None and len(data) == int(index.file_sizes[i]):  # type: ignore[index]
        return Encoded(array, *known)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format or "", img.mode, img.size
    except DECODE_ERRORS as err:
        raise bad(decode_error(err, path)) from err
    if fmt == "JPEG":
        problem = jpeg_problem(data)
    elif fmt == "PNG":
        problem = None if b"IEND" in data[-16:] else "image file is truncated (no PNG IEND)"
    else:
        problem = None
    if problem is not None:
        raise bad(problem)
    checked[i] = (fmt, mode, w, h)
    return Encoded(array, fmt, mode, w, h)


def read_encoded(
    index: DatasetIndex, i: int, via_pil: bool = False
) -> tuple[np.ndarray, int, int]:
    """The bytes DALI should decode for sample ``i``, and the image's width and height.

    JPEG and PNG files in RGB or grayscale go as they are; anything else (or ``via_pil``) is
    decoded by PIL exactly as the torchvision backend does and re-encoded as a lossless PNG.
    Raises ``UnreadableSample`` for what PIL could not read either.
    """
    if not via_pil:
        enc = inspect_encoded(index, i)
        if enc.mode in PASS_MODES.get(enc.format, ()):
            return enc.data, enc.width, enc.height
    img = index.load(i)  # UnreadableSample if PIL cannot decode it
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), img.width, img.height


_DUMMY_PNG: np.ndarray | None = None


def dummy_encoded() -> np.ndarray:
    """A tiny valid image fed in place of a padding or bad sample (its output is discarded)."""
    global _DUMMY_PNG
    if _DUMMY_PNG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        _DUMMY_PNG = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    return _DUMMY_PNG
