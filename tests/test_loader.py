"""The torchvision loader backend: sharding, resume, determinism, bad files; transforms; device."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, Crop, build_index
from pipeline.data.device import to_device
from pipeline.data.loader import build_eval_loader, build_train_loader, eval_order, train_order
from pipeline.data.transforms import EvalTransform, apply_crop, pil_to_tensor
from pipeline.types import Batch

SPEC = DataSpec(
    dataset="synthetic",
    synthetic_size=50,
    augment="cifar",
    batch_size=8,
    eval_batch_size=8,
    workers=0,
    views=3,
)


@pytest.fixture(scope="module")
def index():
    return build_index(SPEC, "train")


def _cat(batches: list[Batch], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def test_eval_covers_every_sample_once_across_processes(index) -> None:
    loaders = [build_eval_loader(index, SPEC, p, 2) for p in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 4  # ceil(50 / 16)
    runs = [list(loader) for loader in loaders]
    ids = torch.cat([_cat(r, "index") for r in runs])
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == list(range(50)) and (ids == -1).sum() == 14
    for r in runs:
        for b in r:
            assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.uint8
            pad = b.index == -1
            assert (b.labels[pad] == 0).all() and (b.view == -1).all()
            assert (b.images[pad] == 0).all()
            assert torch.equal(b.labels[~pad], torch.from_numpy(index.labels[b.index[~pad]]))
    # The eval image is the stored image itself (cifar: no resize needed).
    b = runs[0][0]
    assert torch.equal(b.images[0], pil_to_tensor(index.load(int(b.index[0]))))


def test_train_shards_full_batches_at_most_once(index) -> None:
    plan = AugPlan.from_spec(SPEC, seed=0)
    loaders = [build_train_loader(index, SPEC, plan, 4, 0, p, 2) for p in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 3  # floor(50 / 16)
    runs = [list(loader) for loader in loaders]
    ids = torch.cat([_cat(r, "index") for r in runs]).tolist()
    assert len(ids) == len(set(ids)) == 48
    assert all(len(b) == 8 for r in runs for b in r)
    assert all((b.view == 1).all() for r in runs for b in r)  # epoch 4, views 3 → view 1
    # Each image is the plan's crop of its sample.
    b = runs[1][2]
    i = int(b.index[3])
    crop = plan.draw(i, 1, 32, 32)
    assert torch.equal(b.images[3], apply_crop(index.load(i), crop, plan))


def test_orders_are_pure_and_differ_by_epoch() -> None:
    a = train_order(1000, 16, seed=3, epoch=2, process_index=1, num_processes=4)
    assert np.array_equal(a, train_order(1000, 16, 3, 2, 1, 4)) and a.shape == (15, 16)
    assert not np.array_equal(a, train_order(1000, 16, 3, 3, 1, 4))
    tiny = np.concatenate([train_order(5, 4, 0, 0, p, 2).ravel() for p in range(2)])
    assert len(tiny) == 8 and set(tiny.tolist()) == set(range(5))  # one wrapped step
    e = np.stack([eval_order(10, 3, p, 2) for p in range(2)])
    assert e.shape == (2, 2, 3) and sorted(e[e >= 0].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="process_index=2"):
        eval_order(10, 3, 2, 2)


def test_start_step_yields_exactly_the_remaining_batches(index) -> None:
    plan = AugPlan.from_spec(SPEC, seed=9)
    spec = replace(SPEC, batch_size=4)
    full = list(
        build_train_loader(index, spec, plan, epoch=1, seed=9, process_index=0, num_processes=2)
    )
    resumed = build_train_loader(index, spec, plan, 1, 9, 0, 2, start_step=4)
    assert len(full) == 6 and len(resumed) == 2 and resumed.steps_per_epoch == 6
    rest = list(resumed)
    assert len(rest) == 2
    for x, y in zip(full[4:], rest, strict=True):
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
    assert list(build_train_loader(index, spec, plan, 1, 9, 0, 2, start_step=6)) == []
    with pytest.raises(ValueError, match="start_step"):
        build_train_loader(index, spec, plan, 1, 9, 0, 2, start_step=7)


def test_two_builds_and_workers_give_the_same_batches(index) -> None:
    plan = AugPlan.from_spec(SPEC, seed=1)
    a = list(build_train_loader(index, SPEC, plan, 0, 1, 0, 1))
    b = list(build_train_loader(index, replace(SPEC, workers=2), plan, 0, 1, 0, 1))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
        assert torch.equal(x.labels, y.labels) and torch.equal(x.view, y.view)
    c = list(build_train_loader(index, SPEC, plan, 1, 1, 0, 1))
    assert not torch.equal(_cat(a, "index"), _cat(c, "index"))


def _odd_files(folder: Path) -> dict[str, str]:
    """Good and broken image files; returns name → what it is."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for i in range(3):
        rgb.save(folder / f"good{i}.jpg", quality=90)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    rgb.convert("L").save(folder / "gray.jpg")
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    rgb.save(folder / "png_named.jpg", format="PNG")
    return {"truncated.jpg": "bad", "empty.jpg": "bad"}


def test_odd_and_broken_files(tmp_path: Path) -> None:
    bad_names = _odd_files(tmp_path / "ds" / "train" / "a")
    spec = replace(SPEC, dataset="imagefolder", root=str(tmp_path / "ds"), batch_size=4)
    index = build_index(spec, "train")
    assert len(index) == 8
    for name in ("gray.jpg", "cmyk.jpg", "png_named.jpg"):
        i = [f.decode() for f in index.files].index(f"train/a/{name}")
        img = index.load(i)
        assert img.mode == "RGB" and img.size == (32, 32)
    loader = build_train_loader(
        index, replace(spec, workers=2), AugPlan.from_spec(spec, 0), 0, 0, 0, 1
    )
    batches = list(loader)
    assert len(batches) == 2 and sum(len(b) for b in batches) == 6
    bad = loader.bad_samples()
    assert sorted(Path(b.path).name for b in bad) == sorted(bad_names)
    assert all(b.path.startswith(str(tmp_path)) and b.error for b in bad)
    assert {b.index for b in index.bad} == {b.index for b in bad}
    ev = build_eval_loader(index, spec, 0, 1)
    ids = torch.cat([b.index for b in ev]).tolist()
    assert sorted(i for i in ids if i >= 0) == sorted(set(range(8)) - {b.index for b in bad})
    assert len(ids) == 8 and ids.count(-1) == 2 and len(ev.bad_samples()) == 2


def test_all_bad_batch_is_empty_not_missing(tmp_path: Path) -> None:
    folder = tmp_path / "ds" / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(b"")
    spec = replace(SPEC, dataset="imagefolder", root=str(tmp_path / "ds"), batch_size=2)
    index = build_index(spec, "train")
    batches = list(build_train_loader(index, spec, AugPlan.from_spec(spec, 0), 0, 0, 0, 1))
    assert len(batches) == 1 and batches[0].images.shape == (0, 3, 32, 32)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("flip", [False, True])
def test_rrc_equals_torchvision_resized_crop(flip: bool) -> None:
    img = _noise(97, 61)
    plan = AugPlan("rrc", size=32)
    for top, left, h, w in [(5, 7, 40, 50), (0, 0, 61, 97), (30, 60, 11, 9)]:
        ours = apply_crop(img, Crop(top, left, h, w, flip), plan)
        ref = F.resized_crop(img, top, left, h, w, [32, 32], InterpolationMode.BILINEAR)
        ref = F.hflip(ref) if flip else ref
        assert torch.equal(ours, F.pil_to_tensor(ref))


def test_pad_crop_equals_torchvision_padded_crop() -> None:
    img = _noise(32, 32, 1)
    plan = AugPlan("pad_crop", size=32, padding=4)
    for top, left, flip in [(0, 0, False), (8, 3, True), (4, 4, False)]:
        ours = apply_crop(img, Crop(top, left, 32, 32, flip), plan)
        ref = F.crop(F.pad(img, 4, fill=0), top, left, 32, 32)
        ref = F.hflip(ref) if flip else ref
        assert torch.equal(ours, F.pil_to_tensor(ref))


def test_eval_transforms_equal_torchvision() -> None:
    imagenet = EvalTransform.from_spec(DataSpec(augment="imagenet", image_size=224))
    assert imagenet.resize == 256
    for w, h in [(300, 260), (260, 301), (500, 375)]:
        img = _noise(w, h, w)
        ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(img)
        assert torch.equal(imagenet(img), ref)
    small = EvalTransform.from_spec(DataSpec(augment="imagenet", image_size=64, eval_resize=72))
    img = _noise(100, 90)
    assert torch.equal(
        small(img), T.Compose([T.Resize(72), T.CenterCrop(64), T.PILToTensor()])(img)
    )
    cifar = EvalTransform.from_spec(DataSpec(augment="cifar", image_size=32))
    img = _noise(32, 32)
    assert torch.equal(cifar(img), F.pil_to_tensor(img))
    img = _noise(40, 36)
    ref = F.pil_to_tensor(F.resize(img, [32, 32], InterpolationMode.BILINEAR))
    assert torch.equal(cifar(img), ref)


def test_to_device_normalises_uint8_and_passes_float() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = to_device(batch, "cpu", mean, std, channels_last=True)
    ref = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    assert out.images.dtype == torch.float32 and torch.allclose(out.images, ref, atol=1e-6)
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.labels, batch.labels) and torch.equal(out.index, batch.index)
    done = Batch(ref.clone(), batch.labels, batch.index, batch.view)
    assert torch.equal(to_device(done, "cpu", mean, std).images, ref)
    with pytest.raises(ValueError, match="3 values"):
        to_device(batch, "cpu", [0.5], std)
