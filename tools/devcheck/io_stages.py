"""Stages that measure reading: the environment, JPEG decoding, loaders, memory-mapped rows."""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devcheck.common import ROOT, Context, gpu_info, make_jpegs

OPTIONAL = ("mlflow", "nvidia.dali", "ffcv", "mlxtend", "sklearn", "scipy", "tqdm", "timm",
            "matplotlib", "pytest", "accelerate")


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def environment(ctx: Context) -> dict[str, Any]:
    """Versions, the GPU, which optional packages exist, a GPU JPEG decode, the import graph
    (the training path must not import MLflow when tracking is off)."""
    import numpy
    import PIL
    import torch
    import torchvision

    import launch.train  # noqa: F401  the entry points and what they import at start-up
    import pipeline.data.nvjpeg  # noqa: F401
    import pipeline.teacher.cache_writer  # noqa: F401
    import pipeline.train.trainer  # noqa: F401

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on the machine, or no .git
        commit = ""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": numpy.__version__, "pillow": PIL.__version__,
        "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": gpu_info(), "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "packages": {name: _found(name) for name in OPTIONAL},
        "git_commit": commit or None,
        "mlflow_imported_by_training_path": "mlflow" in sys.modules,
    }
    checks = {"training_path_without_mlflow": "mlflow" not in sys.modules}
    if torch.cuda.is_available():
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        checks["nvjpeg_decodes"] = _nvjpeg_smoke()
    return {"results": info, "checks": checks}


def _nvjpeg_smoke() -> bool:
    import io

    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(buf, format="JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    out = decode_jpeg(data, device="cuda")
    return tuple(out.shape) == (3, 16, 24) and out.is_cuda


def _epoch(spec: Any, index: Any, plan: Any, epoch: int, device: Any) -> dict[str, float]:
    """One loader epoch: images/s with set-up, and steady (from the first batch to the last)."""
    import torch

    from pipeline.data import to_device
    from pipeline.data.backends import build_train_loader

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    count, first, t_first = 0, 0, 0.0
    for k, batch in enumerate(build_train_loader(index, spec, plan, epoch, 0, 0, 1)):
        if cuda:
            batch = to_device(batch, device, spec.mean, spec.std, True)
        count += len(batch)
        if k == 0:
            if cuda:
                torch.cuda.synchronize(device)
            first, t_first = count, time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    steady = (count - first) / (t1 - t_first) if t1 > t_first and count > first else 0.0
    return {"images_per_s": count / (t1 - t0), "steady_images_per_s": steady, "images": count}


def decode(ctx: Context) -> dict[str, Any]:
    """Decodes/s of PIL and torchvision on every core and of nvJPEG on the GPU; the torchvision
    and GPU-decode (nvjpeg) loaders end to end (RandomResizedCrop 224 + flip, batch 256, to the
    device and normalised); nvJPEG's pixels against libjpeg-turbo's."""
    import dataclasses

    import bench_loader
    import torch

    from pipeline.config.schema import DataSpec
    from pipeline.data import AugPlan, BackendUnavailable, build_index

    cores = os.cpu_count() or 1
    root = make_jpegs(ctx.work / "decode-jpegs", {"train": ctx.pick(4096, 48)}, 10,
                      ctx.pick((500, 375), (160, 120)))
    files = sorted((root / "train").rglob("*.jpg"))
    device = torch.device(ctx.device)
    ceiling = bench_loader.DecodeCeiling(files[: ctx.pick(1024, 48)], cores)
    batch = ctx.pick(256, 8)
    if ctx.cuda:
        ceiling.add_gpu(device, batch)
    rates = {}
    for method in ceiling.methods:
        ceiling.rate(method)  # warm-up
        rates[method] = round(statistics.median(ceiling.rate(method) for _ in range(3)), 1)
    spec = DataSpec(dataset="imagefolder", root=str(root), augment="imagenet",
                    image_size=ctx.pick(224, 64), batch_size=batch, views=0,
                    mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                    nvjpeg_device="gpu" if ctx.cuda else "cpu",
                    dali_device="gpu" if ctx.cuda else "cpu")
    loaders: dict[str, Any] = {}
    workers = {"torchvision": cores, "nvjpeg": max(1, cores // 2)}
    if not ctx.quick:  # DALI where installed (the device machine has none)
        workers["dali"] = max(1, cores // 2)
    for backend, n in workers.items():
        b_spec = dataclasses.replace(spec, backend=backend, workers=ctx.pick(n, 1))
        try:
            index = build_index(b_spec, "train")
            plan = AugPlan.from_spec(b_spec, 0)
            _epoch(b_spec, index, plan, 0, device)  # warm-up
            loaders[backend] = {**_epoch(b_spec, index, plan, 1, device), "workers": b_spec.workers}
        except BackendUnavailable as err:
            loaders[backend] = {"skipped": str(err)}
    pixels = _gpu_vs_cpu_pixels(files[:64]) if ctx.cuda else {"skipped": "needs CUDA"}
    results = {"decodes_per_s": rates, "threads": cores, "loaders": loaders,
               "nvjpeg_vs_libjpeg_pixels": pixels, "images": len(files),
               "image_size": ctx.pick([500, 375], [160, 120])}
    checks = {"torchvision_loader": "images_per_s" in loaders["torchvision"],
              "nvjpeg_loader": "images_per_s" in loaders["nvjpeg"]}
    return {"results": results, "checks": checks}


def _gpu_vs_cpu_pixels(files: list[Path]) -> dict[str, Any]:
    """nvJPEG's decode of ``files`` against torchvision's CPU decode (libjpeg-turbo = PIL's)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    diffs = [(decode_jpeg(d, mode=ImageReadMode.RGB).int() - g.cpu().int()).abs().flatten()
             for d, g in zip(data, gpu, strict=True)]
    allv = torch.cat(diffs).float()
    return {"files": len(files), "mean_abs_diff": float(allv.mean()),
            "max_abs_diff": int(allv.max()), "p99_abs_diff": float(allv.quantile(0.99))
            if allv.numel() < 16_000_000 else None,
            "fraction_nonzero": float((allv > 0).float().mean())}


def memmap_reads(ctx: Context) -> dict[str, Any]:
    """Random-row reads of a memory-mapped fp16 array shaped like an ImageNet logit cache
    (2,000 bytes per row), cold (pages dropped with posix_fadvise) and warm (page cache)."""
    import numpy as np

    rows, width, batch = ctx.pick(262_144, 8192), 1000, 256
    path = ctx.work / "memmap" / "logits.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width))
    chunk = 16384
    rng = np.random.default_rng(0)
    for s in range(0, rows, chunk):
        arr[s : s + chunk] = rng.standard_normal((min(chunk, rows - s), width), np.float32)
    arr.flush()
    del arr
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    reader = np.load(path, mmap_mode="r")
    batches = [rng.integers(0, rows, batch) for _ in range(ctx.pick(200, 20))]

    def timed() -> float:
        t0 = time.perf_counter()
        total = 0.0
        for idx in batches:
            total += float(reader[idx][:, 0].sum())  # the rows are really read
        return len(batches) * batch / (time.perf_counter() - t0)

    cold = timed()
    np.asarray(reader[:]).sum()  # the whole file into the page cache
    warm = statistics.median(timed() for _ in range(3))
    results = {"rows": rows, "bytes_per_row": width * 2, "file_mb": round(rows * width * 2 / 1e6),
               "batch_rows": batch, "cold_rows_per_s": round(cold), "warm_rows_per_s": round(warm),
               "cold_batches_per_s": round(cold / batch, 1),
               "warm_batches_per_s": round(warm / batch, 1)}
    path.unlink()
    return {"results": results, "checks": {"read": cold > 0 and warm > 0}}
