"""What only CUDA shows (every test is ``gpu``-marked: skipped without CUDA).

bf16 and fp16 steps (the grad scaler, with the fused SGD the trainer uses on CUDA), a hot loop
free of host syncs (``torch.cuda.set_sync_debug_mode("error")`` around steady-state steps),
CPU tensors in what is saved, the cached teacher on CUDA, the online teacher's one-time cast,
``torch.compile``, and GPU JPEG decoding against the CPU's.

Decode tolerance (nvJPEG against libjpeg-turbo, which equals PIL): nvJPEG has its own IDCT and
chroma upsampling, so pixels differ by a few levels near sharp colour edges. Asserted: mean
absolute difference <= 2 levels (of 255) per pixel and channel, 99th percentile <= 16; after
the crop and resize of the nvjpeg backend against the torchvision backend: mean <= 2.5. These
bounds are priors (no GPU was available when they were written): ``tools/device_check.py``
records the measured figures (decode stage, ``nvjpeg_vs_libjpeg_pixels``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT

pytestmark = pytest.mark.gpu

DECODE_MEAN, DECODE_P99, LOADER_MEAN = 2.0, 16.0, 2.5


def _config(tmp_path: Path, name: str, **train: object) -> Path:
    lines = "".join(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}\n"
                    for k, v in train.items())
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"name: {name}\nrun_dir: {tmp_path / name}\ndata:\n  dataset: synthetic\n"
        "  synthetic_size: 64\n  augment: cifar\n  batch_size: 16\n  eval_batch_size: 32\n"
        "  workers: 0\nmodel:\n  arch: resnet8\nmethod:\n  name: vanilla\n"
        "optim:\n  epochs: 1\n  milestones: []\ntrain:\n  progress: false\n"
        f"  log_every_steps: 1000\n{lines}tracking:\n  enabled: false\n")
    return cfg


def _trainer(cfg: Path):
    from accelerate.state import AcceleratorState

    from pipeline.catalog import load_run_config
    from pipeline.train.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    return Trainer(load_run_config(cfg))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_and_save_cpu_tensors(tmp_path: Path, precision: str) -> None:
    trainer = _trainer(_config(tmp_path, precision, mixed_precision=precision,
                               channels_last=True))
    assert trainer.acc.device.type == "cuda" and torch.backends.cudnn.benchmark
    assert (trainer.acc.scaler is not None) == (precision == "fp16")
    before = {k: v.detach().clone() for k, v in trainer.parts.student.state_dict().items()}
    result = trainer.fit()
    assert result["updates"] == 4
    weights = torch.load(trainer.run_dir / "student.pt", weights_only=True)
    assert {t.device.type for t in weights.values()} == {"cpu"}
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert any(not torch.equal(before[k].cpu(), v) for k, v in weights.items())
    hidden = subprocess.run(
        [PY, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True); "
         "torch.load(sys.argv[2], weights_only=False)", str(trainer.run_dir / "student.pt"),
         str(trainer.run_dir / "checkpoints" / "last.pt")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert hidden.returncode == 0, hidden.stderr[-2000:]


def test_grad_scaler_skips_a_step_with_inf_gradients(tmp_path: Path) -> None:
    trainer = _trainer(_config(tmp_path, "scaler", mixed_precision="fp16"))
    acc, opt = trainer.acc, trainer.optimizer
    assert getattr(opt.optimizer, "_step_supports_amp_scaling", False)  # fused SGD
    x = torch.randn(8, 3, 32, 32, device=acc.device)
    with acc.autocast():
        loss = trainer.parts.student(x).logits.float().pow(2).mean()
    acc.backward(loss)
    params = list(trainer.parts.student.parameters())
    params[0].grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in params]
    scale = float(acc.scaler.get_scale())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True)), "step not skipped"
    assert float(acc.scaler.get_scale()) < scale


def _kd_root(tmp_path: Path) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet14", 10).state_dict(), tmp_path / "teacher.pt")
    return tmp_path


def _kd_config(tmp_path: Path, name: str, source: str, precision: str) -> Path:
    cfg = _config(tmp_path, name, mixed_precision=precision, channels_last=True)
    text = cfg.read_text().replace("method:\n  name: vanilla\n", "method:\n  name: kd\n  T: 4\n")
    text = text.replace("  workers: 0\n", "  workers: 0\n  views: 1\n")
    text += (f"teacher:\n  arch: resnet14\n  weights: {tmp_path / 'teacher.pt'}\n"
             f"  source: {source}\n  cache_dir: {tmp_path / 'cache'}\n")
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize(("mode", "precision"), [("vanilla", "bf16"), ("vanilla", "fp16"),
                                                 ("online", "bf16"), ("cached", "bf16")])
def test_hot_loop_has_no_host_sync(tmp_path: Path, mode: str, precision: str) -> None:
    """Steps 4..6 of 8 (after warm-up, before the epoch's logging step) under the sync debug
    mode "error": any host-device synchronisation raises."""
    from pipeline.catalog import load_run_config
    from pipeline.data import AugPlan, build_index
    from pipeline.data.loader import build_train_loader
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.train.hot_loop import sync_checked

    _kd_root(tmp_path)
    cfg = (_config(tmp_path, mode, mixed_precision=precision, channels_last=True)
           if mode == "vanilla" else _kd_config(tmp_path, mode, mode, precision))
    cfg.write_text(cfg.read_text().replace("synthetic_size: 64", "synthetic_size: 128"))
    spec = load_run_config(cfg)
    if mode == "cached":
        write_cache(spec, ("logits",), device="cuda", progress=False)
    d = spec.data
    batches = list(build_train_loader(build_index(d, d.train_split), d,
                                      AugPlan.from_spec(d, spec.seed), 0, spec.seed, 0, 1))
    assert len(batches) == 8
    trainer = _trainer(cfg)
    trainer._train_loader = lambda epoch, start: sync_checked(batches, 4, 7)
    trainer._train_epoch(0, 0, 0)  # raises on a sync
    assert torch.cuda.get_sync_debug_mode() == 0


def test_cached_teacher_on_cuda(tmp_path: Path) -> None:
    from pipeline.catalog import load_run_config
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.teacher.cached import open_cached_teacher
    from pipeline.teacher.prefetch import ReadAhead
    from pipeline.types import Batch

    _kd_root(tmp_path)
    spec = load_run_config(_kd_config(tmp_path, "cached", "cached", "bf16"))
    write_cache(spec, ("logits",), device="cuda", progress=False)
    cached = open_cached_teacher(spec, ("logits",), 10)
    index = torch.arange(0, 64, 3)
    view = torch.zeros_like(index)
    cpu = cached.lookup(index, view, torch.device("cpu")).logits
    gpu = cached.lookup(index, view, torch.device("cuda")).logits
    assert gpu.is_cuda and torch.equal(cpu, gpu.cpu())
    batch = Batch(torch.zeros(len(index), 3, 1, 1), torch.zeros_like(index), index, view)
    ahead = ReadAhead(cached, 2)
    images = torch.zeros(1, device="cuda")
    (got,) = [ahead(b, images).logits for b in ahead.read_ahead([batch])]
    assert got.is_cuda and torch.equal(got.cpu(), cpu) and ahead.hits == 1
    assert torch.isfinite(cpu).all() and cpu.abs().sum() > 0
    ahead.close()


def test_online_teacher_cast_once_on_cuda() -> None:
    from pipeline.models import build_model
    from pipeline.teacher.online import OnlineTeacher
    from pipeline.types import Batch

    torch.manual_seed(0)
    model = build_model("resnet14", 10).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model.to(memory_format=torch.channels_last)(x).logits
    teacher = OnlineTeacher(model, ("logits",)).to(torch.device("cuda"), channels_last=True,
                                                   dtype=torch.bfloat16)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.zeros(8, dtype=torch.int64), torch.arange(8), torch.zeros(8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = teacher(batch, x).logits
    assert torch.allclose(got.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_compile_on_cuda(tmp_path: Path) -> None:
    trainer = _trainer(_config(tmp_path, "compiled", mixed_precision="bf16", compile=True))
    assert trainer.compile_s is not None and trainer.compile_s > 0
    result = trainer.fit()
    assert result["updates"] == 4
    weights = torch.load(trainer.run_dir / "student.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert not any(k.startswith("_orig_mod") for k in weights)  # compiled in place


def _jpeg_folder(tmp_path: Path) -> Path:
    from tests.test_backends import make_folder

    make_folder(tmp_path)
    return tmp_path


def test_gpu_decode_matches_cpu_decode(tmp_path: Path) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted((_jpeg_folder(tmp_path) / "train").rglob("[0-9]*.jpg"))
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    diffs = torch.cat([(decode_jpeg(d, mode=ImageReadMode.RGB).int() - g.cpu().int())
                       .abs().flatten() for d, g in zip(data, gpu, strict=True)]).float()
    assert diffs.mean() <= DECODE_MEAN, float(diffs.mean())
    assert diffs.quantile(0.99) <= DECODE_P99, float(diffs.quantile(0.99))


def test_nvjpeg_backend_on_cuda_matches_torchvision(tmp_path: Path) -> None:
    from pipeline.config.schema import DataSpec
    from pipeline.data import AugPlan, build_index
    from pipeline.data.backends import build_eval_loader, build_train_loader

    spec = DataSpec(dataset="imagefolder", root=str(_jpeg_folder(tmp_path)),
                    eval_splits=["train"], augment="imagenet", image_size=40, eval_resize=44,
                    batch_size=4, eval_batch_size=4, workers=1, views=2, nvjpeg_device="gpu")
    nv = dataclasses.replace(spec, backend="nvjpeg")
    index = build_index(spec, "train")
    plan = AugPlan.from_spec(spec, seed=3)
    pairs = [(list(build_train_loader(index, spec, plan, 0, 3, 0, 1)),
              list(build_train_loader(index, nv, plan, 0, 3, 0, 1))),
             (list(build_eval_loader(index, spec, 0, 1)), list(build_eval_loader(index, nv, 0, 1)))]
    for ref, got in pairs:
        assert len(ref) == len(got)
        for a, b in zip(ref, got, strict=True):
            assert b.images.is_cuda and b.images.dtype == torch.uint8
            assert torch.equal(a.index, b.index) and torch.equal(a.view, b.view)
            d = (a.images.int() - b.images.cpu().int()).abs().float()
            assert d.mean() <= LOADER_MEAN, float(d.mean())


def test_dali_on_the_gpu_matches_torchvision(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from pipeline.config.schema import DataSpec
    from pipeline.data import AugPlan, build_index, to_device
    from pipeline.data.backends import build_train_loader

    spec = DataSpec(dataset="imagefolder", root=str(_jpeg_folder(tmp_path)),
                    eval_splits=["train"], augment="imagenet", image_size=40, batch_size=4,
                    workers=1, views=2, dali_device="gpu")
    index = build_index(spec, "train")
    plan = AugPlan.from_spec(spec, seed=3)
    ref = list(build_train_loader(index, spec, plan, 0, 3, 0, 1))
    got = list(build_train_loader(index, dataclasses.replace(spec, backend="dali"), plan, 0, 3,
                                  0, 1))
    for a, b in zip(ref, got, strict=True):
        expected = to_device(a, "cuda", spec.mean, spec.std).images
        assert b.images.is_cuda and torch.equal(a.index, b.index)
        assert (expected - b.images).abs().mean() <= LOADER_MEAN / 255 / min(spec.std)
