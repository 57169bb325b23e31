"""Fair share under load: training speed quiet vs beside one busy process, before and after the
project's thread setup (``pipeline/threads.py``).

    python tools/bench_threads.py --json benchmarks/results/threads_cpu.json

Workload (``step``): demo-sized training steps of the demo student (resnet8, batch 64 of 3×32×32,
channels_last, SGD), in a fresh subprocess per measurement so that each gets its own OpenMP
runtime. ``--e2e`` also times the whole user command of a 3-epoch vanilla demo run
(``launch/train.py --cfg configs/demo/vanilla.yaml``, wall time including start-up).

Modes, measured in the same run, in alternating order:
- ``library-defaults``: ``PIPELINE_THREADS=off`` (torch's pools, libgomp's spinning waits), the
  behaviour before the fix;
- ``project``: the setup every entry point now applies.
Competitors: ``quiet`` (none), ``busy-loop`` (one Python busy loop: one core taken), and with
``--torch-competitor`` ``torch-2threads`` (another training process, library defaults).
Printed: images/s per mode and competitor, and the slowdown ratio to the same mode's quiet speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODES = {"library-defaults": {"PIPELINE_THREADS": "off"}, "project": {}}
STEP_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import pipeline  # the thread setup runs here, before torch, as in every entry point
from pipeline.threads import share_cpu_threads
import torch
from pipeline.models.cifar_resnet import resnet8
share_cpu_threads(1)
torch.manual_seed(0)
net = resnet8(10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x).logits, y).backward()
    opt.step()
for _ in range(5):
    step()
deadline = time.perf_counter() + {seconds}
steps, start = 0, time.perf_counter()
while time.perf_counter() < deadline or steps < 5:
    step(); steps += 1
print(steps * 64 / (time.perf_counter() - start))
"""
BUSY_LOOP = "while True: pass"


def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
    return {**env, **MODES[mode], "PYTHONUNBUFFERED": "1"}


def _competitor(kind: str, seconds: float) -> subprocess.Popen | None:
    if kind == "quiet":
        return None
    if kind == "busy-loop":
        code = BUSY_LOOP
    else:  # another training process with the library defaults, running for longer than us
        code = STEP_CHILD.format(root=str(ROOT), seconds=seconds * 4)
    env = _env("library-defaults")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)
    time.sleep(1.0 if kind == "busy-loop" else 4.0)  # let it get going
    return proc


def measure_step(mode: str, competitor: str, seconds: float) -> float:
    other = _competitor(competitor, seconds)
    try:
        code = STEP_CHILD.format(root=str(ROOT), seconds=seconds)
        out = subprocess.run([sys.executable, "-c", code], env=_env(mode), check=True,
                             capture_output=True, text=True).stdout
        return float(out.strip().splitlines()[-1])
    finally:
        if other is not None:
            other.kill()
            other.wait()


def measure_e2e(mode: str, competitor: str, seconds: float, run_root: Path) -> float:
    """Wall seconds of a 3-epoch vanilla demo run (its own run directory, no tracking)."""
    other = _competitor(competitor, seconds)
    run_dir = run_root / f"{mode}-{competitor}-{time.monotonic_ns()}"
    cmd = [sys.executable, "launch/train.py", "--cfg", "configs/demo/vanilla.yaml",
           "--run-dir", str(run_dir), "--set", "optim.epochs=3", "--set", "train.progress=false",
           "--set", "tracking.enabled=false"]
    try:
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=_env(mode), check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        if other is not None:
            other.kill()
            other.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per step measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-competitor", action="store_true",
                   help="also measure beside another 2-thread training process")
    p.add_argument("--e2e", action="store_true", help="also time a 3-epoch demo run")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    competitors = ["quiet", "busy-loop"] + (["torch-2threads"] if args.torch_competitor else [])
    results: dict[str, dict[str, list[float]]] = {"step_img_per_s": {}, "e2e_s": {}}
    for r in range(args.repeats):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for mode in order:
            for comp in competitors:
                key = f"{mode}/{comp}"
                v = measure_step(mode, comp, args.seconds)
                results["step_img_per_s"].setdefault(key, []).append(v)
                print(f"step  {key:35s} {v:8.0f} img/s", flush=True)
                if args.e2e:
                    s = measure_e2e(mode, comp, args.seconds, ROOT / "runs" / "bench-threads")
                    results["e2e_s"].setdefault(key, []).append(s)
                    print(f"e2e   {key:35s} {s:8.1f} s", flush=True)
    summary = _summarise(results, competitors)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python tools/bench_threads.py " + " ".join(argv or sys.argv[1:]),
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "raw": results, "summary": summary}, indent=2) + "\n")
    return 0


def _summarise(results: dict, competitors: list[str]) -> dict:
    out: dict[str, dict] = {}
    for mode in MODES:
        row: dict[str, float] = {}
        quiet_speed = statistics.median(results["step_img_per_s"][f"{mode}/quiet"])
        for comp in competitors:
            speed = statistics.median(results["step_img_per_s"][f"{mode}/{comp}"])
            row[f"step_img_per_s/{comp}"] = round(speed, 1)
            row[f"step_slowdown/{comp}"] = round(quiet_speed / speed, 2)
            if results["e2e_s"]:
                s = statistics.median(results["e2e_s"][f"{mode}/{comp}"])
                row[f"e2e_s/{comp}"] = round(s, 1)
                row[f"e2e_slowdown/{comp}"] = round(
                    s / statistics.median(results["e2e_s"][f"{mode}/quiet"]), 2)
        out[mode] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
