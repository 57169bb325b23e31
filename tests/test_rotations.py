"""Rotated copies in the augmentation plan (SSKD, HSAKD): layout, backends, teacher cache.

- the layout: each image followed by its rotations by 90°, 180°, 270° counter-clockwise, the
  same pixels as ``np.rot90`` of the (H, W) image; labels, index and view repeated;
- every backend available here (torchvision, nvjpeg on the CPU; DALI and FFCV where installed)
  yields the same rotated pixels for (sample, view), within each backend's stated tolerance;
- a teacher cache written for a 4-rotation plan replays the teacher's outputs on the rotated
  copies, keyed by (index, view, rotation); a run without rotations refuses it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, build_index, to_device
from pipeline.data.backends import build_train_loader
from pipeline.data.rotate import rotate_batch, rotate_images
from pipeline.types import Batch
from tests.test_backends import make_folder

# worst pixel difference to the torchvision backend (test_backends.py, test_nvjpeg.py)
TOLERANCE = {"torchvision": 0, "nvjpeg": 1, "dali": 8, "ffcv": 0}
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def test_layout_is_interleaved_counter_clockwise() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 255, (3, 3, 5, 5), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([7, 8, 9]), torch.tensor([0, 4, 2]), torch.tensor([1, 1, 1]))
    out = rotate_batch(batch, 4)
    assert out.images.shape == (12, 3, 5, 5)
    for b in range(3):
        for k in range(4):
            for c in range(3):
                expected = np.rot90(images[b, c].numpy(), k)  # counter-clockwise
                assert np.array_equal(out.images[4 * b + k, c].numpy(), expected), (b, k, c)
    assert out.labels.tolist() == [7] * 4 + [8] * 4 + [9] * 4
    assert out.index.tolist() == [0] * 4 + [4] * 4 + [2] * 4
    assert out.view.tolist() == [1] * 12
    assert out.rotation.tolist() == [0, 1, 2, 3] * 3
    assert rotate_batch(batch, 1) is batch
    cl = rotate_images(images.float().contiguous(memory_format=torch.channels_last), 4)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="square"):
        rotate_images(torch.zeros(1, 3, 4, 6), 4)
    with pytest.raises(ValueError, match="expected one of"):
        rotate_images(images, 2)


def test_plan_carries_rotations_and_old_manifests_still_match() -> None:
    plan = AugPlan.from_spec(DataSpec(augment="cifar", rotations=4), seed=1)
    assert plan.rotations == 4 and AugPlan.from_dict(plan.to_dict()) == plan
    plain = AugPlan.from_spec(DataSpec(augment="cifar"), seed=1)
    assert plain.rotations == 1 and "rotations" not in plain.to_dict()  # as before rotations
    assert plain.draw(3, 1, 32, 32) == plan.draw(3, 1, 32, 32)  # crops and flips unchanged


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    root = tmp_path_factory.mktemp("rot")
    make_folder(root)
    return DataSpec(dataset="imagefolder", root=str(root), eval_splits=["train"],
                    augment="imagenet", image_size=40, eval_resize=44, batch_size=4,
                    eval_batch_size=4, workers=0, views=2, rotations=4, nvjpeg_device="cpu",
                    dali_device="cpu", ffcv_dir=str(root / "ffcv"))


def _backends(spec: DataSpec) -> list[str]:
    out = ["torchvision", "nvjpeg"]
    try:
        import nvidia.dali  # noqa: F401

        out.append("dali")
    except ImportError:
        pass
    try:
        import ffcv  # noqa: F401

        from pipeline.data.ffcv import beton_path
        from pipeline.data.ffcv_write import write_beton

        write_beton(build_index(spec, "train"), beton_path(spec, "train"), workers=1)
        out.append("ffcv")
    except ImportError:
        pass
    return out


def _rotated(spec: DataSpec, backend: str, plan: AugPlan, epoch: int) -> list[Batch]:
    index = build_index(spec, "train")
    loader = build_train_loader(index, dataclasses.replace(spec, backend=backend), plan, epoch,
                                3, 0, 1)
    # the trainer's step: to the device (normalised), then the rotated copies
    return [rotate_batch(to_device(b, "cpu", MEAN, STD), plan.rotations) for b in loader]


def test_every_backend_yields_the_same_rotated_pixels(folder: DataSpec) -> None:
    plan = AugPlan.from_spec(folder, seed=3)
    assert plan.rotations == 4
    backends = _backends(folder)
    for epoch in (0, 1):  # views 0 and 1
        ref = _rotated(folder, "torchvision", plan, epoch)
        assert ref and all(len(b) == 4 * len(b.index.unique()) for b in ref)
        for b in ref:  # rotation k of a row is np.rot90 of its unrotated copy, k times
            for row in range(len(b)):
                k = int(b.rotation[row])
                base = b.images[row - k].numpy()
                assert np.array_equal(b.images[row].numpy(), np.rot90(base, k, axes=(1, 2)))
        for backend in backends[1:]:
            got = _rotated(folder, backend, plan, epoch)
            assert len(got) == len(ref)
            for a, b in zip(ref, got, strict=True):
                for field in ("index", "view", "labels", "rotation"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), (backend, field)
                levels = ((a.images - b.images) * 0.25 * 255).abs().max()  # std 0.25
                assert levels <= TOLERANCE[backend] + 1e-3, (backend, float(levels))


CONFIG = """\
name: rot-cache
data: {{dataset: synthetic, synthetic_size: 24, augment: cifar, batch_size: 8,
        eval_batch_size: 8, workers: 0, views: 2}}
model: {{arch: resnet8, weights: {weights}}}
teacher: {{arch: resnet8, weights: {weights}, cache_dir: {cache}, cache_chunk: 10}}
method: {{name: {method}}}
optim: {{epochs: 2}}
tracking: {{enabled: false}}
train: {{progress: false}}
"""


def test_cache_replays_the_rotated_copies(tmp_path: Path) -> None:
    from pipeline.models import build_model
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.teacher.cached import open_cached_teacher
    from pipeline.teacher.online import OnlineTeacher

    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", 10).state_dict()}, tmp_path / "t.pt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(weights=tmp_path / "t.pt", cache=tmp_path / "cache",
                                 method="sskd.teacher"))
    spec = load_run_config(cfg)
    assert spec.data.rotations == 4  # as the method asks
    fields = ("logits", "embedding")
    write_cache(spec, fields, progress=False)
    index = build_index(spec.data, "train")
    cached = open_cached_teacher(spec, fields, 10, index=index)
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(tmp_path / "t.pt")["model"])
    online = OnlineTeacher(model, fields)
    plan = AugPlan.from_spec(spec.data, spec.seed)
    for epoch in (0, 1):
        for raw in build_train_loader(index, spec.data, plan, epoch, spec.seed, 0, 1):
            batch = rotate_batch(to_device(raw, "cpu", spec.data.mean, spec.data.std), 4)
            a, b = online(batch, batch.images), cached(raw, batch.images)
            assert b.logits.shape == (4 * len(raw), 10)
            torch.testing.assert_close(b.logits, a.logits, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(b.embedding, a.embedding, rtol=2e-3, atol=2e-3)
    # keyed by rotation too: the four sub-rows of a sample differ
    logits = cached.lookup(np.array([0]), np.array([0])).logits
    assert logits.shape == (4, 10) and not torch.allclose(logits[0], logits[1])
    # a run without rotated copies refuses this cache (the plan differs)
    plain = tmp_path / "plain.yaml"
    plain.write_text(CONFIG.format(weights=tmp_path / "t.pt", cache=tmp_path / "cache",
                                   method="kd"))
    with pytest.raises(ConfigError, match="plan.rotations"):
        open_cached_teacher(load_run_config(plain), ("logits",), 10, index=index)


def test_config_resolves_and_checks_rotations(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "t.pt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(weights=tmp_path / "t.pt", cache=tmp_path / "c", method="kd"))
    assert load_run_config(cfg, check_paths=False).data.rotations == 1
    with pytest.raises(ConfigError, match="data.rotations.*reads 1 rotation"):
        load_run_config(cfg, ["data.rotations=4"], check_paths=False)
    with pytest.raises(ConfigError, match="data.rotations: expected 0"):
        load_run_config(cfg, ["data.rotations=3"], check_paths=False)


def test_runs_from_before_rotations_still_resume() -> None:
    from pipeline.train.resume_guard import config_diff

    old = "data:\n  views: 2\n"
    assert config_diff(old, "data:\n  views: 2\n  rotations: 1\n") == {}
    assert config_diff(old, "data:\n  views: 2\n  rotations: 4\n") == {
        "data.rotations": ("<absent>", 4)}
