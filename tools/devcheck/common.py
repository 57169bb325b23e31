"""What the device-check stages share: their context, test data, configs and subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass
class Context:
    """One stage's run: where it writes, how big it is, on which device."""

    out: Path  # the results folder (one JSON per stage)
    work: Path  # scratch space shared by the stages of one check
    quick: bool  # toy sizes on the CPU (CI)
    device: str  # "cuda" or "cpu"
    budget_s: float  # this stage's time budget

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


def child_env(**extra: str) -> dict[str, str]:
    """The environment of launched runs: no accelerate or MLflow settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MLFLOW_"))}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` from the repository root: returncode, seconds, the ends of stdout/stderr."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    return {"cmd": " ".join(cmd[1:]), "returncode": done.returncode,
            "seconds": round(time.perf_counter() - t0, 2), "stdout": done.stdout[-2000:],
            "stderr": done.stderr[-3000:]}


def call_main(main: Any, argv: list[str]) -> dict[str, Any]:
    """An entry point's ``main(argv)`` in this process (what its command line would run, without
    another interpreter start-up): returncode, seconds, the end of what it printed."""
    import contextlib
    import io
    import traceback

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run
    out = io.StringIO()
    t0 = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = main(argv)
    except Exception:  # recorded; the stage goes on
        rc, error = -1, traceback.format_exc()[-3000:]
    text = out.getvalue()
    return {"cmd": " ".join(argv), "returncode": rc, "seconds": round(time.perf_counter() - t0, 2),
            "stdout": text[-2000:], "error": error}


def _photo(args: tuple[Path, int, int, int, int]) -> None:
    """One photo-like JPEG (smooth colours, texture, shapes with edges), quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, w, h, seed, _ = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 80 * np.sin(xx * fx + yy * fy + ph)
    img += rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, quality=90)


def fresh(path: Path) -> Path:
    """``path``, emptied: a run directory left by an earlier check would be resumed."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def make_jpegs(root: Path, splits: dict[str, int], classes: int, size: tuple[int, int],
               seed: int = 0) -> Path:
    """An ImageFolder of photo-like JPEGs (``splits``: images per split), written once with
    every core; sizes vary ±12 % around ``size`` (w, h) and every fourth image is portrait."""
    marker = root / ".complete"
    stamp = repr((splits, classes, size, seed))
    if marker.exists() and marker.read_text() == stamp:
        return root
    fresh(root)
    jobs = []
    w0, h0 = size
    for s, (split, count) in enumerate(splits.items()):
        for i in range(count):
            w, h = (w0, h0) if i % 4 else (h0, w0)
            k = seed + 7919 * s + i
            w, h = w + (k * 37) % max(1, w // 8) - w // 16, h + (k * 53) % max(1, h // 8) - h // 16
            jobs.append((root / split / f"c{i % classes}" / f"{i:05d}.jpg", w, h, k, 0))
    with get_context("fork").Pool(max(1, min(os.cpu_count() or 1, 16))) as pool:
        pool.map(_photo, jobs, chunksize=8)
    marker.write_text(stamp)
    return root


def save_teacher(path: Path, arch: str, classes: int, seed: int = 0) -> Path:
    """A fixed random teacher checkpoint (``{"model": state_dict}``)."""
    import torch

    from pipeline.models import build_model

    if not path.exists():
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": build_model(arch, classes).state_dict()}, path)
    return path


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()}
