"""Stages that run the project's entry points: dry runs, kill-and-resume, the cached teacher."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from devcheck.common import (
    PY,
    ROOT,
    Context,
    call_main,
    child_env,
    fresh,
    make_jpegs,
    run,
    save_teacher,
)

DRY_CONFIGS = ("configs/imagenet/r34_r18_kd.yaml", "configs/imagenet/r34_r18_cid.yaml",
               "configs/imagenet/r50_r18_coss.yaml")
PRECISIONS = ("bf16", "fp16", "no")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def dry_runs(ctx: Context) -> dict[str, Any]:
    """``launch/train.py --dry-run`` of the ImageNet KD/CID/CoSS configs in bf16, fp16, fp32."""
    from launch.train import main

    sets = ctx.pick([], ["--set", "data.image_size=16", "--set", "data.eval_resize=18"])
    runs, checks = {}, {}
    for cfg in DRY_CONFIGS:
        for mp in PRECISIONS:
            name = f"{Path(cfg).stem}/{mp}"
            runs[name] = call_main(main, ["--cfg", str(ROOT / cfg), "--dry-run", "--set",
                                          f"train.mixed_precision={mp}", *sets])
            checks[name] = runs[name]["returncode"] == 0
    return {"results": runs, "checks": checks}


def _data(ctx: Context) -> Path:
    """The small ImageFolder the run stages train on (JPEGs; 10 classes)."""
    return make_jpegs(ctx.work / "jpegs", {"train": ctx.pick(320, 40), "val": ctx.pick(40, 16)},
                      10, ctx.pick((256, 192), (80, 64)))


def run_config(ctx: Context, name: str, weights: str, **extra: Any) -> Path:
    """A small real run: ResNet-18 student, KD from a random ResNet-34, the nvjpeg backend."""
    size = ctx.pick(224, 32)
    batch = ctx.pick(8, 4)
    cfg = {
        "name": name, "seed": 0,
        "data": {"dataset": "imagefolder", "root": str(_data(ctx)), "eval_splits": ["val"],
                 "augment": "imagenet", "image_size": size, "eval_resize": size * 8 // 7,
                 "mean": MEAN, "std": STD, "batch_size": batch, "eval_batch_size": batch,
                 "workers": ctx.pick(4, 1), "backend": "nvjpeg",
                 "views": extra.pop("views", 0)},
        "model": {"arch": "resnet18"},
        "teacher": {"arch": "resnet34", "weights": weights, **extra.pop("teacher", {})},
        "method": {"name": "kd", "T": 4, "ce_weight": 0.1, "kd_weight": 0.9},
        "optim": {"lr": 0.05, "epochs": 2, "milestones": [1], "weight_decay": 1e-4},
        "train": {"mixed_precision": "bf16" if ctx.cuda else "no", "channels_last": ctx.cuda,
                  "deterministic": True, "log_every_steps": 5, "progress": False,
                  "max_steps_per_epoch": ctx.pick(40, 10)},
        "tracking": {"enabled": False},
    }
    path = ctx.work / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def _train(cfg: Path, run_dir: Path) -> dict[str, Any]:
    """``launch/train.py --cfg cfg --run-dir run_dir``, in this process."""
    from launch.train import main

    return call_main(main, ["--cfg", str(cfg), "--run-dir", str(run_dir)])


def _signalled_run(cfg: Path, run_dir: Path, timeout: float) -> dict[str, Any]:
    """Train, send SIGUSR1 as soon as the first epoch's line is printed, wait for the exit."""
    cmd = [PY, str(ROOT / "launch/train.py"), "--cfg", str(cfg), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/") and not sent:
                proc.send_signal(signal.SIGUSR1)
                sent = True
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"returncode": proc.returncode, "signal_sent": sent,
            "seconds": round(time.perf_counter() - t0, 2), "output": "".join(lines)[-2000:]}


CPU_LOAD = """
import json, sys, torch
out = {"cuda_visible": torch.cuda.is_available()}
weights = torch.load(sys.argv[1], weights_only=True)  # no map_location: fails on CUDA tensors
out["student_tensors"] = len(weights)
out["student_devices"] = sorted({str(t.device) for t in weights.values()})
same = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
out["map_location_equal"] = all(torch.equal(same[k], weights[k]) for k in weights)
ckpt = torch.load(sys.argv[2], weights_only=False)

def devices(obj, found):
    if isinstance(obj, torch.Tensor):
        found.add(str(obj.device))
    elif isinstance(obj, dict):
        for v in obj.values():
            devices(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            devices(v, found)
    return found

out["checkpoint_devices"] = sorted(devices(ckpt, set()))
print(json.dumps(out))
"""


def resume(ctx: Context) -> dict[str, Any]:
    """A real short run, SIGUSR1 → exit 75 → resume, against an uninterrupted one; then the
    weights and the checkpoint loaded on a host without CUDA."""
    import torch

    teacher = str(save_teacher(ctx.work / "teacher_r34.pt", "resnet34", 10))
    cfg = run_config(ctx, "devcheck-resume", teacher)
    ref_dir, cut_dir = fresh(ctx.work / "resume-ref"), fresh(ctx.work / "resume-cut")
    ref = _train(cfg, ref_dir)
    cut = _signalled_run(cfg, cut_dir, ctx.budget_s / 2)
    ckpt_path = cut_dir / "checkpoints" / "last.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) \
        if ckpt_path.exists() else {}
    position = {"epoch": state.get("epoch"), "step": state.get("step")}
    resumed = _train(cfg, cut_dir)
    diff = None
    if (ref_dir / "student.pt").exists() and (cut_dir / "student.pt").exists():
        a = torch.load(ref_dir / "student.pt", weights_only=True, map_location="cpu")
        b = torch.load(cut_dir / "student.pt", weights_only=True, map_location="cpu")
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    load = run([PY, "-c", CPU_LOAD, str(cut_dir / "student.pt"), str(ckpt_path)], 120,
               env=child_env(CUDA_VISIBLE_DEVICES=""))
    loaded = json.loads(load["stdout"].strip().splitlines()[-1]) if load["returncode"] == 0 \
        else {}
    steps = ctx.pick(40, 10)
    checks = {
        "reference_run_ok": ref["returncode"] == 0,
        "signal_exit_75": cut["returncode"] == 75 and cut["signal_sent"],
        "checkpoint_mid_epoch_2": position["epoch"] == 1 and 0 < (position["step"] or 0) < steps,
        "resume_ok": resumed["returncode"] == 0 and "resuming" in resumed["stdout"],
        "cpu_host_load_ok": load["returncode"] == 0 and not loaded.get("cuda_visible", True)
        and loaded.get("student_devices") == ["cpu"]
        and loaded.get("checkpoint_devices") == ["cpu"],
    }
    if not ctx.cuda:  # bitwise equal on the CPU; on a GPU reported (kernels may differ)
        checks["resumed_weights_equal"] = diff == 0.0
    return {"results": {"reference": ref, "signalled": cut, "checkpoint": position,
                        "resumed": resumed, "max_abs_weight_diff_vs_uninterrupted": diff,
                        "cpu_host_load": {**load, "parsed": loaded}},
            "checks": checks}


def cached_teacher(ctx: Context) -> dict[str, Any]:
    """Write a teacher cache on the device, verify it, train from it; rows read on CUDA equal
    the CPU reader's and the read-ahead's."""
    teacher = str(save_teacher(ctx.work / "teacher_r34.pt", "resnet34", 10))
    cache_dir = fresh(ctx.work / "cache")
    cfg = run_config(ctx, "devcheck-cached", teacher, views=2,
                     teacher={"source": "cached", "cache_dir": str(cache_dir),
                              "cache_chunk": 64})
    from launch.cache_teacher import main as cache_main

    write = call_main(cache_main, ["--cfg", str(cfg)])
    verify = call_main(cache_main, ["--cfg", str(cfg), "--verify"])
    train = _train(cfg, fresh(ctx.work / "cached-run"))
    rows = _compare_rows(cfg) if write["returncode"] == 0 else {"error": "no cache"}
    checks = {"write_ok": write["returncode"] == 0, "verify_ok": verify["returncode"] == 0,
              "train_ok": train["returncode"] == 0,
              "rows_equal": rows.get("equal", False)}
    return {"results": {"write": write, "verify": verify, "train": train, "rows": rows},
            "checks": checks}


def _compare_rows(cfg: Path) -> dict[str, Any]:
    """The same (index, view) rows through the CPU reader, the device reader, the read-ahead."""
    import numpy as np
    import torch

    from pipeline.catalog import load_run_config
    from pipeline.teacher.cached import open_cached_teacher
    from pipeline.teacher.prefetch import ReadAhead
    from pipeline.types import Batch

    spec = load_run_config(cfg)
    cached = open_cached_teacher(spec, ("logits",), 10)
    n = cached.reader.num_samples
    index = torch.from_numpy(np.random.default_rng(0).permutation(n)[:32].astype(np.int64))
    view = torch.ones_like(index)
    batch = Batch(torch.zeros(len(index), 3, 1, 1), torch.zeros_like(index), index, view)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = cached.lookup(index, view, torch.device("cpu")).logits
    dev = cached.lookup(index, view, device).logits
    ahead = ReadAhead(cached, 2)
    images = torch.zeros(1, device=device)
    got = [ahead(b, images).logits for b in ahead.read_ahead([batch])]
    ahead.close()
    equal = torch.equal(cpu, dev.cpu()) and torch.equal(cpu, got[0].cpu())
    return {"equal": bool(equal), "device": str(dev.device), "read_ahead_hits": ahead.hits,
            "rows": len(index)}
