"""DALI backend pieces that need no pipeline: file checks, install hint, device choice."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config.schema import DataSpec
from pipeline.data import BackendUnavailable, build_index
from pipeline.data.backends import missing_backend
from pipeline.data.dali import dali_device, jpeg_problem, read_encoded
from pipeline.data.index import UnreadableSample


def _jpeg(**kw) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_jpeg_problem_finds_truncation_not_thumbnails() -> None:
    whole = _jpeg(quality=90)
    assert jpeg_problem(whole) is None
    assert jpeg_problem(whole + b"\x00\x00trailing") is None
    assert "truncated" in jpeg_problem(whole[: len(whole) // 2])
    assert "truncated" in jpeg_problem(whole[:-2])
    # An EXIF thumbnail carries its own end marker before the main scan: still truncated.
    exif = Image.Exif()
    exif[0x010E] = "thumbnail stand-in \xff\xd9"
    with_exif = _jpeg(quality=90, exif=exif.tobytes() + b"\xff\xd9")
    assert jpeg_problem(with_exif) is None
    assert "truncated" in jpeg_problem(with_exif[: len(with_exif) - 200])


def test_read_encoded_passes_jpeg_and_converts_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "0.jpg").write_bytes(_jpeg(quality=90))
    Image.new("CMYK", (9, 7), (10, 20, 30, 40)).save(folder / "1.jpg", format="JPEG")
    Image.new("P", (5, 6)).save(folder / "2.jpg", format="PNG")
    (folder / "3.jpg").write_bytes(b"")
    index = build_index(DataSpec(dataset="imagefolder", root=str(tmp_path), eval_splits=[]),
                        "train")
    data, w, h = read_encoded(index, 0)
    assert (w, h) == (40, 30) and data.tobytes() == (folder / "0.jpg").read_bytes()
    for i, size in [(1, (9, 7)), (2, (5, 6))]:
        data, w, h = read_encoded(index, i)
        img = Image.open(io.BytesIO(data.tobytes()))
        assert img.format == "PNG" and img.mode == "RGB" and (w, h) == size
        assert np.array_equal(np.asarray(img), np.asarray(index.load(i)))
    with pytest.raises(UnreadableSample, match="empty"):
        read_encoded(index, 3)


def test_missing_extra_says_what_to_install() -> None:
    err = missing_backend("ffcv", ImportError("No module named 'ffcv'"))
    assert isinstance(err, BackendUnavailable) and ".[ffcv]" in str(err)
    assert "libturbojpeg0-dev" in str(err)
    assert ".[dali]" in str(missing_backend("dali", ImportError("x")))


def test_device_choice() -> None:
    assert dali_device("cpu") is None
    with pytest.raises(ValueError, match="auto|gpu|cpu"):
        dali_device("tpu")
