"""FFCV backend pieces: the PIL-exact renderer, the sidecar checks, the constructor timeout."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, Crop, build_index
from pipeline.data.backends import eval_geometry, train_geometry
from pipeline.data.transforms import EvalTransform, apply_crop, pil_to_tensor

pytest.importorskip("ffcv")
ops = pytest.importorskip("pipeline.data.ffcv_ops")


def _render(img: np.ndarray, geo, size: int) -> np.ndarray:
    out = np.full((size, size, 3), 7, dtype=np.uint8)
    row = np.array([geo.x, geo.y, geo.w, geo.h, geo.resized_w, geo.resized_h, geo.window_x,
                    geo.window_y, int(geo.flip)], dtype=np.int32)
    ops.render(img, row, out, ops.PILLOW_VERTICAL_FIRST, True)
    return out


def _chw(t) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_render_equals_pil_crop_resize_flip() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pil = Image.fromarray(arr)
        size = int(rng.choice([16, 32, 57, 224]))
        plan = AugPlan("rrc", size=size, seed=trial)
        crop = plan.draw(trial, 0, w, h)
        crop = crop._replace(flip=bool(trial % 2))
        want = _chw(apply_crop(pil, crop, plan))  # down- and up-scaling both occur
        got = _render(arr, train_geometry(crop, plan, w, h), size)
        assert np.array_equal(got, want), (w, h, crop, size)


def test_render_pad_crop_and_eval_equal_pil() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plan = AugPlan("pad_crop", size=32, padding=4, seed=0)
    for left, top, flip in [(0, 0, False), (8, 3, True), (4, 4, False), (1, 7, True)]:
        crop = Crop(top, left, 32, 32, flip)
        want = _chw(apply_crop(Image.fromarray(arr), crop, plan))
        assert np.array_equal(_render(arr, train_geometry(crop, plan, 32, 32), 32), want)
    for w, h, tf in [(120, 90, EvalTransform(64, 73)), (50, 80, EvalTransform(64, 73)),
                     (40, 30, EvalTransform(64, 73)), (33, 47, EvalTransform(32, 0)),
                     (32, 32, EvalTransform(32, 0))]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = _chw(tf(Image.fromarray(arr)))
        assert np.array_equal(_render(arr, eval_geometry(tf, w, h), tf.size), want), (w, h, tf)


def _pil_geometry(arr: np.ndarray, row: np.ndarray, size: int) -> np.ndarray:
    """A geometry row done by PIL: crop, bilinear resize, paste the window on black, mirror."""
    x, y, w, h, rw, rh, wx, wy, flip = (int(v) for v in row)
    img = Image.fromarray(arr).crop((x, y, x + w, y + h))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img, (-wx, -wy))
    if flip:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(canvas)


def test_render_every_pass_order_and_window_equals_pil() -> None:
    """Each path of ``render`` (both passes in either order, one pass, none), mirrored or not,
    with windows inside, overlapping and larger than the resized region."""
    rng = np.random.default_rng(3)
    for trial in range(160):
        h_img, w_img = int(rng.integers(8, 160)), int(rng.integers(8, 160))
        arr = rng.integers(0, 256, (h_img, w_img, 3), dtype=np.uint8)
        w, h = int(rng.integers(1, w_img + 1)), int(rng.integers(1, h_img + 1))
        x, y = int(rng.integers(0, w_img - w + 1)), int(rng.integers(0, h_img - h + 1))
        size = int(rng.integers(1, 90))
        kind = trial % 5  # same width, same height, both, tall shrink (vertical first), any
        rw = w if kind in (0, 2) else int(rng.integers(1, 180))
        rh = h if kind in (1, 2) else int(rng.integers(1, 180))
        if kind == 3:
            rw, rh = max(1, w - int(rng.integers(0, 4))), max(1, h // 4)
        wx = int(rng.integers(-size, rw + 1)) if trial % 3 else 0
        wy = int(rng.integers(-size, rh + 1)) if trial % 3 else 0
        row = np.array([x, y, w, h, rw, rh, wx, wy, trial % 2], dtype=np.int32)
        got = np.full((size, size, 3), 7, dtype=np.uint8)
        ops.render(arr, row, got, ops.PILLOW_VERTICAL_FIRST, True)
        assert np.array_equal(got, _pil_geometry(arr, row, size)), (arr.shape, row, size)


def test_decode_jpeg_matches_pil() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0 chroma
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85, subsampling=subsampling)
        out = np.empty(37 * 53 * 3, np.uint8)
        assert ops.decode_jpeg(np.frombuffer(buf.getvalue(), np.uint8), out, 53, 37) == 0
        want = pil_to_tensor(Image.open(io.BytesIO(buf.getvalue()))).permute(1, 2, 0).numpy()
        assert np.array_equal(out.reshape(37, 53, 3), want)


def test_loader_refuses_a_beton_of_other_data(tmp_path: Path) -> None:
    from pipeline.data.ffcv import BetonInfo, beton_path
    from pipeline.data.ffcv_write import write_beton

    spec = DataSpec(dataset="synthetic", synthetic_size=12, augment="cifar", ffcv_dir=str(tmp_path))
    path = beton_path(spec, "train")
    with pytest.raises(ConfigError, match="tools/write_ffcv.py"):
        BetonInfo(path, build_index(spec, "train"))
    write_beton(build_index(spec, "train"), path, workers=1)
    BetonInfo(path, build_index(spec, "train"))  # matches
    other = DataSpec(dataset="synthetic", synthetic_size=13, augment="cifar")
    with pytest.raises(ConfigError, match="another dataset"):
        BetonInfo(path, build_index(other, "train"))


def test_construction_timeout_guards_the_hang() -> None:
    from pipeline.data.ffcv import _construct

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="trap 1"):
        _construct(lambda: time.sleep(5), timeout=0.2)
    assert time.perf_counter() - t0 < 4  # it did not wait for the hung constructor
    assert _construct(lambda: 42, timeout=5) == 42
