"""Loader throughput: images/s of each backend at equal threads, against a decode-only ceiling.

    python tools/bench_loader.py --json runs/bench_loader.json [--data DIR] [--images 500]
        [--threads 2] [--batch 64] [--size 224] [--epochs 8]
        [--backends torchvision,dali,ffcv,nvjpeg] [--device cpu|cuda] [--channels-last]

``--device cuda``: every backend's batches are taken to the GPU and normalised there
(``to_device``, channels-last with ``--channels-last``), as the trainer does, and DALI and
nvjpeg decode on the GPU; each timed epoch ends with ``torch.cuda.synchronize()``. The decode
ceiling then also times nvJPEG (``decode_jpeg(device="cuda")`` on batches of ``--batch``
files).

Without ``--data`` it writes an ImageNet-like folder (``--images`` JPEGs of about 500×375 at
quality 90, textured so they compress like photographs: ~95 KB each) under ``--workdir``. Every
backend runs the same training epochs (RandomResizedCrop ``--size`` from the augmentation plan +
flip, batch ``--batch``, ``--threads`` workers/threads, uint8 batches on the CPU); the first
epoch is a warm-up (FFCV compiles with numba, DALI builds its pipeline), the figure is the
median over the following epochs. The ``.beton`` for FFCV is written before timing (not timed).

Backends and ceiling run in rounds (one epoch of each backend, one pass of each decoder per
round), so that a change in the machine's load weighs on all figures alike. The decode ceiling
decodes the same files, already in memory, in a tight loop on ``--threads`` threads with
libjpeg-turbo two ways — PIL (``Image.open(...).convert('RGB')``, no draft mode)
and TurboJPEG's ``tjDecompress2`` with the accurate IDCT (the FFCV backend's decoder) when the
ffcv extra is installed — and reports the faster as ``decode_ceiling``. It is full-image
decoding only: no crop, resize or batching.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pipeline  # noqa: E402,F401  (its thread setup must precede torch's OpenMP)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from pipeline.config.schema import DataSpec  # noqa: E402
from pipeline.data import AugPlan, BackendUnavailable, build_index  # noqa: E402
from pipeline.data.backends import build_train_loader  # noqa: E402


def make_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` photo-like JPEGs (q90, ~500×375, some portrait) in 10 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (500, 375) if i % 4 else (375, 500)
        w, h = w + int(rng.integers(-40, 41)), h + int(rng.integers(-30, 31))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):  # smooth colour fields
            fx, fy, ph = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 128 + 80 * np.sin(xx * fx + yy * fy + ph)
        noise = rng.normal(0, 1, (h // 2 + 1, w // 2 + 1, 3)).astype(np.float32)
        texture = np.kron(noise, np.ones((2, 2, 1), np.float32))[:h, :w]
        img += 30 * texture + rng.normal(0, 16, (h, w, 3)).astype(np.float32)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(12):  # objects with edges
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), colour)
        pil = pil.filter(ImageFilter.GaussianBlur(0.35))
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pil.save(folder / f"{i:05d}.jpg", quality=90)


class DecodeCeiling:
    """Full-image decodes per second of the files (read into memory once) on ``threads``."""

    def __init__(self, files: list[Path], threads: int) -> None:
        self.blobs = [f.read_bytes() for f in files]
        self.pool = ThreadPoolExecutor(threads)
        self.methods: dict[str, Any] = {"pil": self._pil, "torchvision_cpu": self._tv_cpu}
        self.tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in self.blobs]
        try:
            from pipeline.data.ffcv_ops import decode_jpeg
        except ImportError:
            return
        self.decode_jpeg = decode_jpeg
        self.arrays = [np.frombuffer(b, np.uint8) for b in self.blobs]
        self.shapes = []
        for b in self.blobs:
            with Image.open(io.BytesIO(b)) as img:
                self.shapes.append(img.size)
        self.methods["turbojpeg_accurate_dct"] = self._turbo

    def _pil(self, i: int) -> None:
        with Image.open(io.BytesIO(self.blobs[i])) as img:
            img.convert("RGB")

    def _tv_cpu(self, i: int) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        decode_jpeg(self.tensors[i], mode=ImageReadMode.RGB)

    def add_gpu(self, device: torch.device, batch: int) -> None:
        """nvJPEG: ``batch`` files per ``decode_jpeg(device=...)`` call, from pinned memory."""
        from torchvision.io import ImageReadMode, decode_jpeg

        pinned = [t.pin_memory() for t in self.tensors]

        def run() -> None:
            for k in range(0, len(pinned), batch):
                decode_jpeg(pinned[k : k + batch], mode=ImageReadMode.RGB, device=device)
            torch.cuda.synchronize(device)

        self.bulk = {"nvjpeg_gpu": run}
        self.methods["nvjpeg_gpu"] = None

    def _turbo(self, i: int) -> None:
        w, h = self.shapes[i]
        self.decode_jpeg(self.arrays[i], np.empty(w * h * 3, np.uint8), w, h)

    def rate(self, method: str) -> float:
        fn = self.methods[method]
        t0 = time.perf_counter()
        if fn is None:
            self.bulk[method]()
        else:
            list(self.pool.map(fn, range(len(self.blobs)), chunksize=8))
        return len(self.blobs) / (time.perf_counter() - t0)


def run_epoch(spec: DataSpec, index: Any, plan: AugPlan, epoch: int,
              device: torch.device | None = None, channels_last: bool = False
              ) -> tuple[float, int]:
    """(images/s, images) of one training epoch of ``spec.backend``, loader set-up included;
    with a CUDA ``device`` every batch is normalised on it and the epoch ends synchronised."""
    from pipeline.data import to_device

    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    count = 0
    for batch in build_train_loader(index, spec, plan, epoch, 0, 0, 1):
        if cuda:
            batch = to_device(batch, device, spec.mean, spec.std, channels_last)
        count += len(batch)
    if cuda:
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - t0), count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--data", help="an ImageFolder root with a train/ split (default: generate)")
    p.add_argument("--workdir", default="/tmp/bench_loader", help="for generated data, .beton")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8, help="timed rounds (after one warm-up)")
    p.add_argument("--backends", default="torchvision,dali,ffcv,nvjpeg")
    p.add_argument("--device", default="cpu", help="cpu | cuda (module docstring)")
    p.add_argument("--channels-last", action="store_true", help="with --device cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    work = Path(args.workdir)
    root = Path(args.data) if args.data else work / "images"
    if not args.data and not (root / "train").is_dir():
        print(f"writing {args.images} JPEGs to {root}", flush=True)
        make_images(root, args.images)
    spec = DataSpec(dataset="imagefolder", root=str(root), augment="imagenet",
                    image_size=args.size, batch_size=args.batch, workers=args.threads, views=0,
                    ffcv_dir=str(work / "ffcv"), dali_device="gpu" if cuda else "cpu",
                    nvjpeg_device="gpu" if cuda else "cpu")
    files = sorted((root / "train").rglob("*.jpg"))
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"images_per_s": {}, "details": {}, "skipped": {}}
    ready: dict[str, tuple[DataSpec, Any, AugPlan]] = {}
    for name in args.backends.split(","):
        b_spec = dataclasses.replace(spec, backend=name)
        try:
            if name == "ffcv":
                from pipeline.data.ffcv import beton_path
                from pipeline.data.ffcv_write import write_beton

                t0 = time.perf_counter()
                write_beton(build_index(spec, "train"), beton_path(spec, "train"),
                            workers=args.threads)
                result["ffcv_write_s"] = round(time.perf_counter() - t0, 1)
            index = build_index(b_spec, "train")
            plan = AugPlan.from_spec(b_spec, seed=0)
            # warm-up: numba compilation, DALI build, caches, CUDA allocator
            run_epoch(b_spec, index, plan, 0, device, args.channels_last)
        except BackendUnavailable as err:
            result["skipped"][name] = str(err)
            print(f"{name}: skipped ({err})", flush=True)
            continue
        ready[name] = (b_spec, index, plan)
    ceiling = DecodeCeiling(files, args.threads)
    if cuda:
        ceiling.add_gpu(device, args.batch)
    for method in ceiling.methods:
        ceiling.rate(method)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in [*ready, *ceiling.methods]}
    # Rounds: one epoch of every backend and one pass of every ceiling method each, so that a
    # change of machine load over the run weighs on all of them alike.
    for epoch in range(1, args.epochs + 1):
        for name, (b_spec, index, plan) in ready.items():
            rate, count = run_epoch(b_spec, index, plan, epoch, device, args.channels_last)
            rates[name].append(rate)
            result["details"].setdefault(name, {})["images_per_epoch"] = count
        for method in ceiling.methods:
            rates[method].append(ceiling.rate(method))
    for name in ready:
        result["images_per_s"][name] = round(statistics.median(rates[name]), 1)
        result["details"][name]["epochs"] = [round(r, 1) for r in rates[name]]
        print(f"{name}: {result['images_per_s'][name]:.1f} img/s (epochs "
              f"{result['details'][name]['epochs']})", flush=True)
    ceilings = {m: statistics.median(rates[m]) for m in ceiling.methods}
    best_method = max(ceilings, key=ceilings.__getitem__)
    result["decode_ceiling"] = round(ceilings[best_method], 1)
    result["decode_ceiling_method"] = best_method
    result["decode_ceilings"] = {k: round(v, 1) for k, v in ceilings.items()}
    tv = result["images_per_s"].get("torchvision")
    result["ratio_to_torchvision"] = {
        k: round(v / tv, 2) for k, v in result["images_per_s"].items()} if tv else {}
    result["fraction_of_ceiling"] = {
        k: round(v / result["decode_ceiling"], 2) for k, v in result["images_per_s"].items()}
    sizes = [Image.open(f).size for f in files[:50]]
    result["setup"] = {
        "images": len(files), "mean_bytes": int(np.mean([f.stat().st_size for f in files])),
        "mean_size": [int(np.mean([s[0] for s in sizes])), int(np.mean([s[1] for s in sizes]))],
        "threads": args.threads, "batch": args.batch, "size": args.size,
        "device": str(device), "channels_last": args.channels_last,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "augment": "RandomResizedCrop (plan) + flip, uint8 CHW batches",
        "timed_epochs": args.epochs, "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(f"decode ceiling: {result['decode_ceilings']} img/s")
    print(f"ratio to torchvision: {result['ratio_to_torchvision']}")
    print(f"fraction of the ceiling: {result['fraction_of_ceiling']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
