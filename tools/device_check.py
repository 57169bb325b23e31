"""One command that checks the project on a GPU machine and writes one JSON per stage.

    python tools/device_check.py --out $OUT            # on the device: ~5 min, at most 8
    python tools/device_check.py --out runs/check --quick   # toy sizes on a CPU (CI): ~1.5 min
    make device-check OUT=runs/device-check

Needs only torch, torchvision, accelerate, numpy, pyyaml and pillow (and pytest for the
``gpu_tests`` stage): no MLflow (tracking is off in every run), DALI, FFCV, mlxtend or
scikit-learn — a backend that is not installed is reported as skipped. Runs from the source
tree; its JPEGs are generated with PIL in a scratch folder (``--work``, default a temporary
folder: it holds the big files, ``--out`` only the JSON).

Stages (``tools/devcheck/``), each in its own process with its own time budget, so that one
that fails, crashes or hangs writes its error to its JSON and the others still run (with
``--quick`` all share one process unless ``--isolate``: a failing stage is still caught and
written on its own, a hang times out the rest):

- ``environment``: versions, GPU, optional packages present, an nvJPEG decode, the import
  graph (the training path without MLflow);
- ``sync_free``: the trainer's steady-state steps under ``torch.cuda.set_sync_debug_mode``;
- ``dry_runs``: ``launch/train.py --dry-run`` of the ImageNet KD, CID and CoSS configs in bf16,
  fp16 and fp32;
- ``resume``: a real short run (JPEG folder, nvjpeg backend, online KD), SIGUSR1 → exit 75 →
  resume, against an uninterrupted run; ``student.pt`` and the checkpoint loaded in a process
  without CUDA;
- ``cached_teacher``: cache written on the device, ``--verify``, a run from it, rows equal;
- ``throughput``: ResNet-34 → ResNet-18 at 224 px, bf16, channels-last, batch 256, in-memory
  batches: student-only, cached and online steps of our trainer against a bare PyTorch loop
  in the same run (``tools/bench_distill.py``), with issue 12's goals;
- ``decode``: PIL and torchvision decodes/s on every core, nvJPEG on the GPU, the torchvision
  and GPU-decode loaders end to end, nvJPEG's pixels against libjpeg-turbo's;
- ``memmap``: cold and warm random-row reads of a memory-mapped logit array;
- ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (skipped without CUDA).

``<out>/summary.json`` lists every stage's status; the exit status is 0 when every stage is ok
(or skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(ROOT), str(TOOLS)]

# name: (module, function, budget in s on a device, budget in --quick mode, needs CUDA)
STAGES: dict[str, tuple[str, str, float, float, bool]] = {
    "environment": ("io_stages", "environment", 60, 60, False),
    "sync_free": ("speed", "sync_free", 80, 90, False),
    "dry_runs": ("runs", "dry_runs", 100, 120, False),
    "resume": ("runs", "resume", 100, 120, False),
    "cached_teacher": ("runs", "cached_teacher", 80, 120, False),
    "throughput": ("speed", "throughput", 120, 90, False),
    "decode": ("io_stages", "decode", 90, 60, False),
    "memmap": ("io_stages", "memmap_reads", 45, 30, False),
    "gpu_tests": ("gpu_tests", "gpu_tests", 150, 60, True),
}
TOTAL_S = 470.0  # the whole check stays under 8 minutes (--quick: the sum of its budgets)
MIN_STAGE_S = 20.0  # a stage left less than this is skipped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="toy sizes (CI, CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available")
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="time budget of the check")
    p.add_argument("--isolate", action="store_true",
                   help="with --quick: still one process per stage")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def _device(choice: str | None) -> str:
    if choice:
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write(out: Path, name: str, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def _cpu_seconds() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_stage(args: argparse.Namespace, name: str) -> bool:
    """The child side: run one stage, write its JSON (errors included); True if ok."""
    from devcheck.common import Context

    module, function, *_ = STAGES[name]
    ctx = Context(args.out, args.work, args.quick, args.device, args.budget)
    record: dict[str, Any] = {"stage": name, "device": ctx.device, "quick": ctx.quick,
                              "budget_s": ctx.budget_s}
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        fn = getattr(__import__(f"devcheck.{module}", fromlist=[function]), function)
        found = fn(ctx)
        checks = found.get("checks", {})
        record.update(found, status="ok" if all(checks.values()) else "failed")
    except Exception:  # the stage's own failure: recorded, the runner goes on
        record.update(status="failed", error=traceback.format_exc()[-6000:])
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["cpu_seconds"] = round(_cpu_seconds() - cpu0, 2)  # this process and its children
    _write(args.out, name, record)
    failed = [k for k, v in record.get("checks", {}).items() if not v]
    print(f"{name}: {record['status']} in {record['seconds']:.1f} s"
          + (f" (failed: {', '.join(failed)})" if failed else ""), flush=True)
    return record["status"] == "ok"


def _child(args: argparse.Namespace, names: list[str], budget: float) -> dict[str, dict]:
    """Run stages ``names`` in one process (and process group) within ``budget`` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", ",".join(names), "--out",
           str(args.out), "--work", str(args.work), "--device", args.device,
           "--budget", str(budget), *(["--quick"] if args.quick else [])]
    t0 = time.perf_counter()
    for name in names:  # a JSON left from an earlier check must not pass for this one's
        (args.out / f"{name}.json").unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        status = "crashed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stages and every run they started
        output, _ = proc.communicate()
        status = "timeout"
    seconds = round(time.perf_counter() - t0, 2)
    records = {}
    for name in names:
        path = args.out / f"{name}.json"
        if path.exists():
            records[name] = json.loads(path.read_text())
            continue
        records[name] = {"stage": name, "status": status, "seconds": seconds,
                         "budget_s": budget, "device": args.device, "quick": args.quick,
                         "returncode": proc.returncode, "error": output[-6000:]}
        _write(args.out, name, records[name])
    print(output[-3000:] if any(r["status"] != "ok" for r in records.values())
          else "\n".join(output.strip().splitlines()[-len(names):]), flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.device = _device(args.device)
    if args.stage:
        results = [run_stage(args, name) for name in args.stage.split(",")]
        return 0 if all(results) else 1
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="device-check-"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        print(f"--stages: unknown {unknown}; expected names from {list(STAGES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    runnable = []
    for name in names:
        if STAGES[name][4] and args.device != "cuda":
            records[name] = {"stage": name, "status": "skipped", "reason": "needs CUDA"}
            _write(args.out, name, records[name])
        else:
            runnable.append(name)
    # One process per stage; with --quick one process for all (interpreter start-ups are most
    # of a toy run's time), each stage still caught and written on its own.
    groups = [runnable] if args.quick and not args.isolate else [[n] for n in runnable]
    for group in groups:
        left = args.total_s - (time.perf_counter() - t0)
        budget = min(sum(STAGES[n][3 if args.quick else 2] for n in group), left - 5.0)
        if budget < MIN_STAGE_S:
            for name in group:
                records[name] = {"stage": name, "status": "skipped",
                                 "reason": "the check's time is spent"}
                _write(args.out, name, records[name])
            continue
        records.update(_child(args, group, budget))
    summary = {n: {k: records[n].get(k) for k in ("status", "seconds", "reason")}
               for n in names}
    ok = all(s["status"] in ("ok", "skipped") for s in summary.values())
    result = {"ok": ok, "device": args.device, "quick": args.quick,
              "seconds": round(time.perf_counter() - t0, 1), "stages": summary,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    _write(args.out, "summary", result)
    print(json.dumps(result, indent=1))
    if own_work:
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
