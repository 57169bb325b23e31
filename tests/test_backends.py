"""DALI (CPU) and FFCV against the torchvision backend: same batches, crops, pixels, bad files.

One small ImageFolder for the module: 18 photo-like JPEGs of assorted sizes, plus the odd files
every backend must survive — a grayscale JPEG, a CMYK JPEG, a PNG named .jpg (all good) and a
truncated JPEG and an empty file (bad). 23 samples in 3 classes, RandomResizedCrop to 40×40.

Pixel tolerance: FFCV is bit-identical to torchvision (libjpeg-turbo with the accurate IDCT, and
Pillow's resampler reimplemented). DALI (CPU) decodes the crop region only and resizes in floating
point with its own border handling: measured on these files over 6 epochs, its images differ from
PIL's by at most 3 levels (of 255) and 0.18 on average per pixel and channel (the asserts allow 8
and 0.5); pad-crop images (no resize) are exact for both.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, build_index
from pipeline.data.backends import build_eval_loader, build_train_loader
from pipeline.types import Batch

BACKENDS = ["dali", "ffcv"]
DALI_MAX_DIFF = 8  # levels of 255, worst pixel (measured: 3)
DALI_MEAN_DIFF = 0.5  # mean absolute difference per pixel and channel (measured: 0.18)
ODD = ("gray.jpg", "cmyk.jpg", "png_named.jpg")
BAD = ("truncated.jpg", "empty.jpg")


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx * rng.uniform(0.02, 0.2) + yy * rng.uniform(0.02, 0.2)
                                      + c) for c in range(3)], axis=-1)
    img += rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(18):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(50, 130)), int(rng.integers(40, 120))
        _photo(rng, w, h).save(folder / f"{i:02d}.jpg", quality=90)
    odd = root / "train" / "c0"
    _photo(rng, 70, 50).convert("L").save(odd / "gray.jpg", quality=90)
    _photo(rng, 64, 72).convert("CMYK").save(odd / "cmyk.jpg", quality=90)
    _photo(rng, 60, 60).save(odd / "png_named.jpg", format="PNG")
    buf = io.BytesIO()
    _photo(rng, 90, 80).save(buf, format="JPEG", quality=90)
    whole = buf.getvalue()
    (root / "train" / "c1" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "c2" / "empty.jpg").write_bytes(b"")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataSpec, Path]:
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("ffcv")
    from pipeline.data.ffcv import beton_path
    from pipeline.data.ffcv_write import write_beton

    root = tmp_path_factory.mktemp("odd")
    make_folder(root)
    spec = DataSpec(dataset="imagefolder", root=str(root), eval_splits=["train"],
                    augment="imagenet", image_size=40, eval_resize=44, batch_size=4,
                    eval_batch_size=4, workers=1, views=2, ffcv_dir=str(root / "ffcv"),
                    dali_device="cpu")
    meta = write_beton(build_index(spec, "train"), beton_path(spec, "train"), workers=1)
    assert meta["counts"] == {"original": 19, "raw": 2, "reencoded": 0, "bad": 2}
    return spec, root


def _index(spec: DataSpec):
    return build_index(spec, "train")


def _with(spec: DataSpec, backend: str) -> DataSpec:
    return dataclasses.replace(spec, backend=backend)


def _names(index, ids: list[int]) -> set[str]:
    return {Path(index.path(i)).name for i in ids}


def _cat(batches: list[Batch], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def _compare(ref: list[Batch], got: list[Batch], exact: bool) -> list[float]:
    assert len(ref) == len(got)
    diffs = []
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.view, b.view)
        assert torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
        d = (a.images.int() - b.images.int()).abs()
        if exact:
            assert d.max() == 0, f"max diff {d.max()} at samples {a.index.tolist()}"
        for k in range(len(a)):
            if int(a.index[k]) < 0:
                continue
            mirrored = (a.images[k].flip(-1).int() - b.images[k].int()).abs().float().mean()
            mean = d[k].float().mean()
            assert mean < mirrored or mirrored == 0, "the flip differs from the plan's"
            diffs.append(float(mean))
        if not exact:
            assert d.max() <= DALI_MAX_DIFF, f"max diff {d.max()}"
    return diffs


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_match_torchvision(folder, backend: str) -> None:
    spec, _ = folder
    index = _index(spec)
    plan = AugPlan.from_spec(spec, seed=3)
    for epoch in (0, 1):  # views 0 and 1
        ref = list(build_train_loader(index, spec, plan, epoch, 3, 0, 1))
        loader = build_train_loader(index, _with(spec, backend), plan, epoch, 3, 0, 1)
        got = list(loader)
        diffs = _compare(ref, got, exact=backend == "ffcv")
        assert np.mean(diffs) <= DALI_MEAN_DIFF
        # The crop boxes and flips are the plan's (index, view) draws.
        assert (_cat(got, "view") == epoch).all()
    # The bad files were reported and left out (the odd good ones: see the eval test).
    assert _names(index, [b.index for b in loader.bad_samples()]) <= set(BAD)
    assert not set(BAD) & _names(index, _cat(got, "index").tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batches_match_torchvision(folder, backend: str) -> None:
    spec, _ = folder
    index = _index(spec)
    ref = list(build_eval_loader(index, spec, 0, 1))
    loader = build_eval_loader(index, _with(spec, backend), 0, 1)
    got = list(loader)
    diffs = _compare(ref, got, exact=backend == "ffcv")
    assert np.mean(diffs) <= DALI_MEAN_DIFF
    ids = _cat(got, "index")
    assert sorted(ids[ids >= 0].tolist()) == sorted(set(range(23)) - {b.index for b in index.bad})
    assert _names(index, [b.index for b in loader.bad_samples()]) == set(BAD)
    assert set(ODD) <= _names(index, ids[ids >= 0].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_cover_each_sample_once(folder, backend: str) -> None:
    spec, _ = folder
    index = _index(spec)
    plan = AugPlan.from_spec(spec, seed=0)
    b_spec = _with(spec, backend)
    train = [build_train_loader(index, b_spec, plan, 5, 0, p, 2) for p in range(2)]
    ref = [build_train_loader(index, spec, plan, 5, 0, p, 2) for p in range(2)]
    assert len(train[0]) == len(train[1]) == len(ref[0]) == 2  # floor(23 / 8)
    runs = [list(loader) for loader in train]
    for p in range(2):
        assert [b.index.tolist() for b in runs[p]] == [b.index.tolist() for b in ref[p]]
    ids = _cat(runs[0] + runs[1], "index").tolist()
    assert len(ids) == len(set(ids))  # none twice (16 planned, minus bad ones)
    evals = [build_eval_loader(index, b_spec, p, 2) for p in range(2)]
    assert len(evals[0]) == len(evals[1]) == 3  # ceil(23 / 8)
    seen = torch.cat([_cat(list(e), "index") for e in evals])
    good = sorted(set(range(23)) - {b.index for b in index.bad})
    assert sorted(seen[seen >= 0].tolist()) == good  # every readable sample exactly once


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_yields_the_rest_once(folder, backend: str) -> None:
    spec, _ = folder
    index = _index(spec)
    b_spec = _with(spec, backend)
    plan = AugPlan.from_spec(spec, seed=1)
    full = list(build_train_loader(index, b_spec, plan, 4, 1, 0, 1))
    resumed_loader = build_train_loader(index, b_spec, plan, 4, 1, 0, 1, start_step=3)
    assert len(resumed_loader) == len(full) - 3
    resumed = list(resumed_loader)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_pad_crop_on_arrays_is_exact(tmp_path: Path) -> None:
    """CIFAR-style plan on an in-memory index: DALI gets raw arrays, FFCV raw pixels."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("ffcv")
    from pipeline.data.ffcv import beton_path
    from pipeline.data.ffcv_write import write_beton

    spec = DataSpec(dataset="synthetic", synthetic_size=40, augment="cifar", batch_size=8,
                    eval_batch_size=16, workers=1, views=2, ffcv_dir=str(tmp_path),
                    dali_device="cpu")
    index = build_index(spec, "train")
    meta = write_beton(index, beton_path(spec, "train"), workers=1)
    assert meta["counts"]["raw"] == 40
    plan = AugPlan.from_spec(spec, seed=0)
    ref = list(build_train_loader(index, spec, plan, 1, 0, 0, 1))
    ref_eval = list(build_eval_loader(index, spec, 0, 1))
    for backend in BACKENDS:
        got = list(build_train_loader(index, _with(spec, backend), plan, 1, 0, 0, 1))
        _compare(ref, got, exact=True)
        _compare(ref_eval, list(build_eval_loader(index, _with(spec, backend), 0, 1)), True)


def test_cached_teacher_serves_the_same_rows(folder, tmp_path: Path) -> None:
    """Distillation from a teacher cache: every backend asks for the same (index, view) rows."""
    from pipeline.catalog import load_run_config
    from pipeline.models import build_model
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.teacher.cached import open_cached_teacher

    _, root = folder
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", 3).state_dict()}, tmp_path / "t.pt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"name: backend-cache\ndata:\n  dataset: imagefolder\n  root: {root}\n"
        f"  eval_splits: [train]\n  augment: imagenet\n  image_size: 40\n  eval_resize: 44\n"
        f"  batch_size: 4\n  eval_batch_size: 8\n  workers: 0\n  views: 2\n"
        f"  ffcv_dir: {root / 'ffcv'}\n  dali_device: cpu\n"
        f"model:\n  arch: resnet8\nteacher:\n  arch: resnet8\n  weights: {tmp_path / 't.pt'}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n  cache_chunk: 16\n"
        "method:\n  name: kd\n  T: 4\noptim:\n  epochs: 2\ntracking:\n  enabled: false\n"
        "train:\n  progress: false\n"
    )
    spec = load_run_config(cfg)
    write_cache(spec, ("logits",), progress=False)
    index = build_index(spec.data, "train")
    cached = open_cached_teacher(spec, ("logits",), 3, index=index)
    plan = AugPlan.from_spec(spec.data, spec.seed)
    for epoch in (0, 1):
        ref = list(build_train_loader(index, spec.data, plan, epoch, spec.seed, 0, 1))
        for backend in BACKENDS:
            data = _with(spec.data, backend)
            got = list(build_train_loader(index, data, plan, epoch, spec.seed, 0, 1))
            assert [list(zip(b.index.tolist(), b.view.tolist(), strict=True)) for b in got] == [
                list(zip(b.index.tolist(), b.view.tolist(), strict=True)) for b in ref]
            for a, b in zip(ref, got, strict=True):
                assert torch.equal(cached(a).logits, cached(b).logits)


def test_dali_recovers_from_a_decoder_failure(folder, monkeypatch) -> None:
    """A file that passes the checks but that DALI cannot decode goes through PIL instead."""
    from pipeline.data import dali_feed

    spec, _ = folder
    index = _index(spec)
    plan = AugPlan.from_spec(spec, seed=3)
    ref = list(build_train_loader(index, spec, plan, 0, 3, 0, 1))
    target = int(ref[1].index[0])
    real = dali_feed.read_encoded

    def broken(index, i, via_pil=False):
        data, w, h = real(index, i, via_pil)
        if i == target and not via_pil:  # a JPEG with no image data at all
            return np.frombuffer(b"\xff\xd8\xff\xd9", dtype=np.uint8), w, h
        return data, w, h

    monkeypatch.setattr(dali_feed, "read_encoded", broken)
    loader = build_train_loader(index, _with(spec, "dali"), plan, 0, 3, 0, 1)
    got = list(loader)
    assert target in loader.via_pil
    _compare(ref, got, exact=False)


def test_ffcv_random_crop_option_keeps_the_order(folder) -> None:
    """``data.ffcv_random_crop``: FFCV's own crops, but the batches of the shared order."""
    spec, _ = folder
    index = _index(spec)
    plan = AugPlan.from_spec(spec, seed=3)
    ref = list(build_train_loader(index, spec, plan, 0, 3, 0, 1))
    rc = dataclasses.replace(spec, backend="ffcv", ffcv_random_crop=True)
    got = list(build_train_loader(index, rc, plan, 0, 3, 0, 1))
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in ref]
    assert all(b.images.shape == a.images.shape for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coss_neighbour_batches_through_every_backend(folder, tmp_path: Path,
                                                      backend: str) -> None:
    """``data.sampler: coss`` gives the same anchor + neighbour batches whatever the backend."""
    spec, _ = folder
    index = _index(spec)
    lists = np.stack([np.roll(np.arange(len(index)), -s) for s in range(1, 5)], axis=1)
    lists = lists.astype(np.int32)
    np.save(tmp_path / "nn.npy", lists)
    coss = dataclasses.replace(spec, sampler="coss", coss_k=1, coss_m=3,
                               neighbours=str(tmp_path / "nn.npy"))
    plan = AugPlan.from_spec(coss, seed=3)
    ref = list(build_train_loader(index, coss, plan, 0, 3, 0, 1))
    got = list(build_train_loader(index, _with(coss, backend), plan, 0, 3, 0, 1))
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in ref]
    _compare(ref, got, exact=backend == "ffcv")


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "processes"),
                         [("torchvision", 1), ("dali", 1), ("ffcv", 1), ("ffcv", 2)])
def test_trainer_runs_through_the_odd_folder(folder, tmp_path: Path, backend: str,
                                             processes: int) -> None:
    """launch/train.py with ``data.backend``: trains over the good files, reports the bad ones
    (with two gloo processes, each meets some of them: the report gathers both)."""
    import json
    import subprocess

    from tests.conftest import PY, ROOT, run_env, train_cmd

    spec, root = folder
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"name: odd-{backend}\ndata:\n  dataset: imagefolder\n  root: {root}\n"
        f"  eval_splits: [train]\n  augment: imagenet\n  image_size: 40\n  eval_resize: 44\n"
        f"  batch_size: 4\n  eval_batch_size: 8\n  workers: 1\n  backend: {backend}\n"
        f"  ffcv_dir: {root / 'ffcv'}\n  dali_device: cpu\nmodel:\n  arch: resnet8\n"
        "method:\n  name: vanilla\noptim:\n  epochs: 2\ntracking:\n  enabled: false\n"
        "train:\n  progress: false\n"
    )
    run_dir = tmp_path / "run"
    cmd, env = train_cmd(str(cfg), run_dir=run_dir), run_env()
    if processes > 1:
        cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *cmd[1:]]
        env = run_env(ACCELERATE_USE_CPU="true")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["last"]["epoch"] == 2 and metrics["world_size"] == processes
    assert all(name in done.stdout for name in BAD), done.stdout[-3000:]
    report = json.loads((run_dir / "bad_samples.json").read_text())
    assert sorted(Path(r["path"]).name for r in report) == sorted(BAD)


def test_every_backend_names_the_file_of_an_unreadable_image(tmp_path: Path) -> None:
    """PIL's 'cannot identify image file <_io.BytesIO object at 0x…>' from the readers that
    decode bytes in memory (DALI's check, the FFCV writer) names the file instead."""
    from pipeline.data.dali import read_encoded
    from pipeline.data.ffcv_write import prepare
    from pipeline.data.index import UnreadableSample

    folder = tmp_path / "ds" / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "good.jpg")
    (folder / "notes.jpg").write_bytes(b"this is a text file, not an image\n" * 4)
    spec = DataSpec(dataset="imagefolder", root=str(tmp_path / "ds"), eval_splits=["train"])
    index = build_index(spec, "train")
    bad = [i for i in range(len(index)) if index.path(i).endswith("notes.jpg")][0]
    errors = []
    for read in (lambda: index.load(bad), lambda: read_encoded(index, bad)):
        with pytest.raises(UnreadableSample) as info:
            read()
        errors.append(info.value.bad.error)
    errors.append(prepare(index, bad, 0, 90)[2])
    for error in errors:
        assert error is not None and "BytesIO" not in error, error
    assert str(folder / "notes.jpg") in errors[1] and str(folder / "notes.jpg") in errors[2]
