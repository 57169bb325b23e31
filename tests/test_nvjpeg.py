"""The nvjpeg backend on the CPU (torchvision's libjpeg-turbo decode, the same torch render code
as on a GPU) against the torchvision backend: same batches, geometry, bad files; pixels within
a stated tolerance.

Tolerance (measured on these files, 2 epochs + evaluation): decoding is bit-identical to PIL's;
the resize (Pillow's bilinear filter in floating point instead of Pillow's 22-bit fixed point)
leaves at most 1 level (of 255) on some pixels, 0.03 on average per pixel and channel. The
asserts allow 1 and 0.1. Pad-crop images (no resize) are exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, build_index
from pipeline.data.backends import Geometry, build_eval_loader, build_train_loader
from pipeline.data.render import render
from pipeline.data.transforms import EvalTransform, pil_to_tensor
from pipeline.types import Batch
from tests.test_backends import BAD, ODD, make_folder

MAX_DIFF = 1  # levels of 255, worst pixel (measured: 1)
MEAN_DIFF = 0.1  # mean absolute difference per pixel and channel (measured: 0.03)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    root = tmp_path_factory.mktemp("odd-nvjpeg")
    make_folder(root)
    return DataSpec(dataset="imagefolder", root=str(root), eval_splits=["train"],
                    augment="imagenet", image_size=40, eval_resize=44, batch_size=4,
                    eval_batch_size=4, workers=1, views=2, nvjpeg_device="cpu")


def _nv(spec: DataSpec) -> DataSpec:
    return dataclasses.replace(spec, backend="nvjpeg")


def _compare(ref: list[Batch], got: list[Batch], exact: bool = False) -> list[float]:
    assert len(ref) == len(got)
    diffs = []
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.view, b.view)
        assert torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
        d = (a.images.int() - b.images.int()).abs()
        assert d.max() <= (0 if exact else MAX_DIFF), f"max diff {d.max()} at {a.index.tolist()}"
        for k in range(len(a)):
            if int(a.index[k]) >= 0:
                mirrored = (a.images[k].flip(-1).int() - b.images[k].int()).abs().float().mean()
                assert d[k].float().mean() < mirrored or mirrored == 0, "flip differs"
                diffs.append(float(d[k].float().mean()))
    return diffs


def test_train_batches_match_torchvision(folder: DataSpec) -> None:
    index = build_index(folder, "train")
    plan = AugPlan.from_spec(folder, seed=3)
    diffs: list[float] = []
    for epoch in (0, 1):
        ref = list(build_train_loader(index, folder, plan, epoch, 3, 0, 1))
        loader = build_train_loader(index, _nv(folder), plan, epoch, 3, 0, 1)
        got = list(loader)
        diffs += _compare(ref, got)
        assert all((b.view == epoch).all() for b in got)
    assert np.mean(diffs) <= MEAN_DIFF
    names = {Path(index.path(b.index)).name for b in loader.bad_samples()}
    assert names <= set(BAD) and names  # the bad files were met and reported


def test_eval_batches_match_torchvision(folder: DataSpec) -> None:
    index = build_index(folder, "train")
    ref = list(build_eval_loader(index, folder, 0, 1))
    loader = build_eval_loader(index, _nv(folder), 0, 1)
    got = list(loader)
    assert np.mean(_compare(ref, got)) <= MEAN_DIFF
    ids = torch.cat([b.index for b in got])
    good = sorted(set(range(len(index))) - {b.index for b in index.bad})
    assert sorted(ids[ids >= 0].tolist()) == good
    assert {Path(index.path(b.index)).name for b in loader.bad_samples()} == set(BAD)
    assert set(ODD) <= {Path(index.path(i)).name for i in ids[ids >= 0].tolist()}


def test_resume_and_two_processes(folder: DataSpec) -> None:
    index = build_index(folder, "train")
    plan = AugPlan.from_spec(folder, seed=1)
    nv = _nv(folder)
    full = list(build_train_loader(index, nv, plan, 4, 1, 0, 1))
    resumed = list(build_train_loader(index, nv, plan, 4, 1, 0, 1, start_step=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    for p in range(2):
        ref = list(build_train_loader(index, folder, plan, 5, 0, p, 2))
        got = list(build_train_loader(index, nv, plan, 5, 0, p, 2))
        assert [b.index.tolist() for b in got] == [b.index.tolist() for b in ref]


def test_pad_crop_on_arrays_is_exact() -> None:
    spec = DataSpec(dataset="synthetic", synthetic_size=40, augment="cifar", batch_size=8,
                    eval_batch_size=16, workers=0, views=2, nvjpeg_device="cpu")
    index = build_index(spec, "train")
    plan = AugPlan.from_spec(spec, seed=0)
    _compare(list(build_train_loader(index, spec, plan, 1, 0, 0, 1)),
             list(build_train_loader(index, _nv(spec), plan, 1, 0, 0, 1)), exact=True)
    _compare(list(build_eval_loader(index, spec, 0, 1)),
             list(build_eval_loader(index, _nv(spec), 0, 1)), exact=True)


def test_an_early_stop_leaves_no_thread_behind(folder: DataSpec) -> None:
    import threading

    index = build_index(folder, "train")
    plan = AugPlan.from_spec(folder, seed=0)
    for batch in build_train_loader(index, _nv(folder), plan, 0, 0, 0, 1):
        assert len(batch) > 0
        break
    import gc

    gc.collect()
    assert not [t for t in threading.enumerate() if t.name == "nvjpeg-decode"]


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr)


@pytest.mark.parametrize("flip", [False, True])
def test_render_window_outside_the_image_and_flip(flip: bool) -> None:
    """Eval-style windows larger than the resized image (zeros around) and offset windows."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    image = pil_to_tensor(_pil(arr))
    for geo in (Geometry(0, 0, 50, 30, 50, 30, -3, -7, flip),   # padding on all sides
                Geometry(5, 4, 20, 18, 20, 18, 2, 1, flip),     # window inside a region
                Geometry(0, 0, 50, 30, 24, 16, 4, 2, flip)):    # resize then window
        size = 40 if geo.window_x < 0 else 12
        region = _pil(arr).crop((geo.x, geo.y, geo.x + geo.w, geo.y + geo.h))
        if region.size != (geo.resized_w, geo.resized_h):
            region = region.resize((geo.resized_w, geo.resized_h), Image.Resampling.BILINEAR)
        ref = region.crop((geo.window_x, geo.window_y, geo.window_x + size,
                           geo.window_y + size))
        if flip:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = render(image, geo, size)
        assert (got.int() - pil_to_tensor(ref).int()).abs().max() <= MAX_DIFF


def test_eval_transform_of_small_images_matches() -> None:
    """A 20×14 image under a 32/36 eval transform: resized up, then a centred window."""
    from pipeline.data.backends import eval_geometry

    arr = np.random.default_rng(1).integers(0, 256, (14, 20, 3), dtype=np.uint8)
    tf = EvalTransform(size=32, resize=36)
    ref = tf(_pil(arr))
    got = render(pil_to_tensor(_pil(arr)), eval_geometry(tf, 20, 14), 32)
    assert (got.int() - ref.int()).abs().max() <= MAX_DIFF


def test_device_choice() -> None:
    from pipeline.data.nvjpeg import decode_device

    assert decode_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="auto|gpu|cpu"):
        decode_device("tpu")
    if not torch.cuda.is_available():
        assert decode_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA"):
            decode_device("gpu")
