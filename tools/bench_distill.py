"""Steps/s of distillation: no teacher, online teacher, cached teacher; and the limit.

    python tools/bench_distill.py --json runs/bench_distill.json
    python tools/bench_distill.py --device cuda --pairs imagenet_resnet34_resnet18_224px \
        --json runs/bench_distill_gpu.json          # bf16, channels_last, batch 256 by default

For each teacher → student pair, on synthetic data:

- ``student_only``, ``online``, ``cached``: OUR trainer code path. A ``Trainer`` is built from a
  config exactly as ``launch/train.py`` builds it (Accelerate, Distiller, method, optimiser,
  teacher source; ``vanilla`` for student-only, ``kd`` otherwise; the cached source reads a cache
  written beforehand by ``write_cache``) and its own ``Trainer._train_epoch`` runs the steps —
  to_device, set_lr, teacher (online or cached), distiller forward, backward, optimiser step,
  loss bookkeeping — over batches the real train loader produced and kept in memory, so data
  loading is not part of any timing.
- ``bare_student`` (student forward, CE + KD loss on precomputed teacher logits, backward, SGD
  step), ``bare_teacher_fwd`` (the teacher's forward under no_grad) and ``bare_online`` (both in
  one step): plain PyTorch on the same batches, the reference for what a step must cost. It
  uses what any careful loop uses: the run's autocast (``--precision``), channels-last tensors
  (``--channels-last``), the teacher's convolution weights cast once to the autocast dtype,
  cuDNN autotuning, and a fused SGD on CUDA.

Steady state only: every mode is warmed up (``--warmup`` untimed repeats: cuDNN autotuning,
allocator growth) before any timing, and each timed window is closed by
``torch.cuda.synchronize()`` on a GPU (the window starts synchronised too), so queued work is
counted in the window that queued it.

Reported per pair: steps/s of every mode; ``cached_over_online`` = online step time / cached
step time (measured); ``limit`` = (bare student step + bare teacher forward) / bare student step,
the speed-up a free cache would give; ``flop_bound`` = 1 + teacher forward FLOPs / (3 · student
forward FLOPs) (FlopCounterMode; a training step costs about 3 forwards); ``online_vs_bare`` =
our online step time / bare online step time (1.00 = no overhead). Every mode is warmed up, then
the modes are timed in turn, in an order rotated every repeat (so load from other processes
hits all alike); steps/s are medians over the repeats, ratios medians of per-repeat ratios. On a
CPU the headline figures use process CPU time (``--clock``), which other processes sharing the
cores disturb far less than wall time; both are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402,F401  (its thread setup must precede torch's OpenMP)

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config.schema import RunSpec  # noqa: E402
from pipeline.data import AugPlan, build_index  # noqa: E402
from pipeline.data.loader import build_train_loader  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.types import Batch  # noqa: E402

PAIRS: dict[str, dict[str, Any]] = {
    # The GPU figure of issue 12: ResNet-34 → ResNet-18 at 224 px (synthetic 224×224 images, no
    # resize: only the batch shape matters for a step).
    "imagenet_resnet34_resnet18_224px": {
        "teacher": "resnet34", "student": "resnet18", "augment": "none",
        "size": 224, "classes": 1000, "batch": 256,
    },
    "imagenet_resnet34_resnet18_64px": {
        "teacher": "resnet34", "student": "resnet18", "augment": "tiny_imagenet",
        "size": 64, "classes": 1000, "batch": 32,
    },
    "cifar_resnet56_resnet20_32px": {
        "teacher": "resnet56", "student": "resnet20", "augment": "cifar",
        "size": 32, "classes": 100, "batch": 64,
    },
}
T, CE_W, KD_W = 4.0, 0.1, 0.9
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4

CONFIG = """\
name: bench-{mode}
run_dir: {root}/run-{mode}
data: {{dataset: synthetic, synthetic_size: {n}, num_classes: {classes}, augment: {augment},
       image_size: {size}, batch_size: {batch}, eval_batch_size: {batch}, workers: 0, views: 1,
       eval_splits: [val]}}
model: {{arch: {student}}}
method: {method}
optim: {{lr: {lr}, momentum: {momentum}, weight_decay: {wd}, epochs: 1, schedule: constant,
        milestones: []}}
train: {{cpu: {cpu}, progress: false, log_every_steps: 1000000, max_steps_per_epoch: {steps},
        mixed_precision: "{precision}", channels_last: {channels_last}}}
tracking: {{enabled: false}}
"""
TEACHER = "teacher: {{arch: {teacher}, weights: {weights}, source: {source}, cache_dir: {cache}}}\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_spec(pair: dict[str, Any], root: Path, mode: str, steps: int, cpu: bool,
              precision: str = "no", channels_last: bool = False) -> RunSpec:
    """The run config of one mode (student_only | online | cached), written and loaded."""
    method = "{name: vanilla}" if mode == "student_only" else (
        f"{{name: kd, T: {T}, ce_weight: {CE_W}, kd_weight: {KD_W}}}")
    text = CONFIG.format(mode=mode, root=root, n=steps * pair["batch"], method=method, lr=LR,
                         momentum=MOMENTUM, wd=WD, cpu=str(cpu).lower(), steps=steps,
                         precision=precision, channels_last=str(channels_last).lower(), **pair)
    if mode != "student_only":
        text += TEACHER.format(teacher=pair["teacher"], weights=root / "teacher.pt",
                               source="cached" if mode == "cached" else "online",
                               cache=root / "cache")
    path = root / f"{mode}.yaml"
    path.write_text(text)
    return load_run_config(path)


def trainer_step_fn(spec: RunSpec, batches: list[Batch]) -> tuple[Callable[[], None], Any]:
    """One call runs ``len(batches)`` steps of our Trainer's own epoch loop."""
    from pipeline.train.trainer import Trainer

    trainer = Trainer(spec)
    if trainer.steps_per_epoch != len(batches):
        raise RuntimeError(
            f"expected {len(batches)} steps per epoch, found {trainer.steps_per_epoch}"
        )
    trainer._train_loader = lambda epoch, start_step: batches  # type: ignore[method-assign]
    return (lambda: trainer._train_epoch(0, 0, 0)), trainer


class Precision:
    """The autocast of a run (``--precision``) and, for fp16, a grad scaler; channels-last."""

    def __init__(self, precision: str, device: torch.device, channels_last: bool) -> None:
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device = device
        self.channels_last = channels_last
        self.scaler = (torch.amp.GradScaler(device.type)
                       if precision == "fp16" and device.type == "cuda" else None)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def bare_fns(pair: dict[str, Any], teacher: torch.nn.Module, batches: list[Batch],
             mean: list[float], std: list[float], prec: Precision) -> dict[str, Callable]:
    """Plain PyTorch: student step (CE + KD on given teacher logits), teacher forward, both."""
    from pipeline.teacher.online import cast_frozen_weights

    device = prec.device
    student = prec.model(build_model(pair["student"], pair["classes"])).train()
    teacher = prec.model(teacher)
    if device.type == "cuda" and prec.dtype is not None:
        cast_frozen_weights(teacher, prec.dtype)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD,
                          fused=True if device.type == "cuda" else None)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    fmt = torch.channels_last if prec.channels_last else torch.contiguous_format

    def images(b: Batch) -> torch.Tensor:
        x = b.images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        return (x.float().div_(255) - m).div_(s)

    with torch.no_grad(), prec.autocast():
        fixed = [teacher(images(b)).logits for b in batches]

    def student_step(x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor) -> None:
        with prec.autocast():
            logits = student(x).logits
            kd = F.kl_div(F.log_softmax(logits.float() / T, 1),
                          F.softmax(t_logits.float() / T, 1), reduction="batchmean") * T * T
            loss = CE_W * F.cross_entropy(logits, y) + KD_W * kd
        opt.zero_grad(set_to_none=True)
        if prec.scaler is None:
            loss.backward()
            opt.step()
        else:
            prec.scaler.scale(loss).backward()
            prec.scaler.step(opt)
            prec.scaler.update()

    def bare_student() -> None:
        for b, t_logits in zip(batches, fixed, strict=True):
            student_step(images(b), b.labels.to(device, non_blocking=True), t_logits)

    def bare_teacher_fwd() -> None:
        for b in batches:
            with torch.no_grad(), prec.autocast():
                teacher(images(b))

    def bare_online() -> None:
        for b in batches:
            x = images(b)
            with torch.no_grad(), prec.autocast():
                t_logits = teacher(x).logits
            student_step(x, b.labels.to(device, non_blocking=True), t_logits)

    return {"bare_student": bare_student, "bare_teacher_fwd": bare_teacher_fwd,
            "bare_online": bare_online}


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def bench_pair(name: str, pair: dict[str, Any], args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    from pipeline.teacher.cache_writer import write_cache

    cpu = device.type == "cpu"
    pair = {**pair, **{k: v for k, v in (("batch", args.batch), ("size", args.size)) if v}}
    prec = Precision(args.precision, device, args.channels_last)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher = build_model(pair["teacher"], pair["classes"])
        torch.save(teacher.state_dict(), root / "teacher.pt")
        teacher = teacher.to(device).eval()
        specs = {m: make_spec(pair, root, m, args.steps, cpu, args.precision, args.channels_last)
                 for m in ("student_only", "online", "cached")}
        t0 = time.perf_counter()
        write_cache(specs["cached"], ("logits",), device=device, progress=False)
        cache_s = time.perf_counter() - t0
        d = specs["online"].data
        index = build_index(d, d.train_split)
        plan = AugPlan.from_spec(d, specs["online"].seed)
        batches = list(build_train_loader(index, d, plan, 0, specs["online"].seed, 0, 1))
        x = torch.zeros(pair["batch"], 3, pair["size"], pair["size"], device=device)
        flops_t = forward_flops(teacher, x)
        flops_s = forward_flops(build_model(pair["student"], pair["classes"]).to(device), x)
        fns: dict[str, Callable[[], None]] = {}
        for mode, spec in specs.items():
            fns[mode], _ = trainer_step_fn(spec, batches)
        fns.update(bare_fns(pair, teacher, batches, d.mean, d.std, prec))
        torch.set_num_threads(args.threads)  # after the Trainers: each sets its share of cores
        wall: dict[str, list[float]] = {k: [] for k in fns}
        cpu_s: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            for _ in range(args.warmup):
                fn()
        names = list(fns)
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                fn = fns[k]
                sync(device)
                t, c = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                wall[k].append((time.perf_counter() - t) / len(batches))
                cpu_s[k].append((time.process_time() - c) / len(batches))
    flop_bound = 1.0 + flops_t / (3.0 * flops_s)
    by_clock = {"wall": summarise(wall), "cpu": summarise(cpu_s)}
    result = {
        "teacher": pair["teacher"], "student": pair["student"], "image_size": pair["size"],
        "batch": pair["batch"], "classes": pair["classes"], "device": str(device),
        "precision": args.precision, "channels_last": args.channels_last,
        "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup_repeats": args.warmup,
        "clock": args.clock,
        "images_per_s": {k: v * pair["batch"]
                         for k, v in by_clock[args.clock]["steps_per_s"].items()},
        **by_clock[args.clock],
        "flop_bound": flop_bound,
        "teacher_fwd_gflops": flops_t / 1e9,
        "student_fwd_gflops": flops_s / 1e9,
        "cache_write_s": cache_s,
        "by_clock": by_clock,
    }
    for clock, r in by_clock.items():
        mark = " (reported)" if clock == args.clock else ""
        print(f"{name} [{clock} time{mark}]: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["steps_per_s"].items()) + " steps/s")
        print(f"  cached/online {r['cached_over_online']:.3f} (limit {r['limit']:.3f}: "
              f"{r['cached_over_online_vs_limit']:.1%} of it; FLOP bound {flop_bound:.3f}); "
              f"online vs bare {r['online_vs_bare']:.3f}")
    return result


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    """Per-step seconds → median steps/s, and the ratios as medians of per-repeat ratios.

    A ratio is taken within each repeat (all modes ran within seconds of each other) and the
    median taken over repeats: slow drifts of the machine's load cancel out of it.
    """
    step = {k: statistics.median(v) for k, v in times.items()}

    def ratio(f: Callable[[dict[str, float]], float]) -> float:
        n = len(times["online"])
        return statistics.median(f({k: v[i] for k, v in times.items()}) for i in range(n))

    limit = ratio(lambda t: (t["bare_student"] + t["bare_teacher_fwd"]) / t["bare_student"])
    speedup = ratio(lambda t: t["online"] / t["cached"])
    return {
        "steps_per_s": {k: 1.0 / v for k, v in step.items()},
        "step_ms": {k: 1e3 * v for k, v in step.items()},
        "step_ms_all": {k: [round(1e3 * x, 2) for x in v] for k, v in times.items()},
        "cached_over_online": speedup,
        "limit": limit,
        "cached_over_online_vs_limit": speedup / limit,
        "online_vs_bare": ratio(lambda t: t["online"] / t["bare_online"]),
        "student_only_vs_bare_student": ratio(lambda t: t["student_only"] / t["bare_student"]),
        "cached_vs_bare_student": ratio(lambda t: t["cached"] / t["bare_student"]),
        "cached_over_student_only": ratio(lambda t: t["student_only"] / t["cached"]),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=None,
                   help="default: the 224 px pair on cuda, the two small pairs on cpu")
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per mode (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats per mode first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast of every mode (default: bf16 on cuda, no on cpu)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last tensors (default: on for cuda)")
    p.add_argument("--batch", type=int, default=0, help="override the pairs' batch size")
    p.add_argument("--size", type=int, default=0, help="override the pairs' image size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP "
                   "threads wait on each other whenever one is preempted, and timings explode)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="which time the headline figures use (both are in the JSON); default: "
                   "cpu time on a CPU device (robust to other processes sharing the cores), "
                   "wall time on a GPU")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark of ``args`` (``parser().parse_args``): the JSON-ready results."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the Trainer then keeps our choice
    torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" else "wall"
    cuda = args.device.startswith("cuda")
    if args.precision is None:
        args.precision = "bf16" if cuda else "no"
    if args.channels_last is None:
        args.channels_last = cuda
    if args.pairs is None:
        args.pairs = (["imagenet_resnet34_resnet18_224px"] if cuda else
                      ["cifar_resnet56_resnet20_32px", "imagenet_resnet34_resnet18_64px"])
    device = torch.device(args.device)
    t0 = time.perf_counter()
    results = {name: bench_pair(name, PAIRS[name], args, device) for name in args.pairs}
    out = {"pairs": results, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "seconds": time.perf_counter() - t0, "load_average_after": os.getloadavg(),
           "method": "Trainer._train_epoch over in-memory batches (see the module docstring)",
           "gpu": torch.cuda.get_device_name(device) if cuda else None,
           "argv": sys.argv[1:]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {out['seconds']:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
