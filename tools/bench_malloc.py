"""CPU training steps with glibc's malloc defaults vs ``pipeline.malloc`` (freed memory kept).

Each measurement is a fresh process (``PIPELINE_MALLOC=off`` or on) that runs SGD steps of a CIFAR
ResNet on one 64-image batch with one thread for ``--seconds`` and reports images per second and
minor page faults per step; the two settings alternate ``--reps`` times, and the ratio of their
medians is printed. Run it on a quiet machine:

    .venv/bin/python tools/bench_malloc.py --out benchmarks/results/malloc_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import pipeline  # its malloc and thread setup run here, before torch
from pipeline.threads import share_cpu_threads
import torch
from pipeline.models.cifar_resnet import resnet8, resnet20
share_cpu_threads(1)
torch.manual_seed(0)
net = {{"resnet8": resnet8, "resnet20": resnet20}}[{arch!r}](10)
net = net.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x).logits, y).backward()
    opt.step()
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < {seconds} or steps < 5:
    step(); steps += 1
rate = steps * 64 / (time.perf_counter() - start)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(json.dumps({{"images_per_s": rate, "faults_per_step": faults}}))
"""


def measure(arch: str, mode: str, seconds: float) -> dict[str, float]:
    env = {**os.environ, "PIPELINE_MALLOC": mode, "OMP_NUM_THREADS": "1"}
    code = CHILD.format(root=str(ROOT), arch=arch, seconds=seconds)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet8", "resnet20"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    results: dict[str, dict] = {}
    for arch in args.archs:
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(args.reps):
            for mode in runs:
                runs[mode].append(measure(arch, mode, args.seconds))
        rate = {m: statistics.median(r["images_per_s"] for r in rs) for m, rs in runs.items()}
        faults = {m: statistics.median(r["faults_per_step"] for r in rs)
                  for m, rs in runs.items()}
        results[arch] = {"glibc_defaults": {"images_per_s": round(rate["off"], 1),
                                            "faults_per_step": round(faults["off"], 1)},
                         "kept": {"images_per_s": round(rate["on"], 1),
                                  "faults_per_step": round(faults["on"], 1)},
                         "speedup": round(rate["on"] / rate["off"], 3),
                         "runs": runs}
        print(f"{arch}: {rate['off']:.0f} -> {rate['on']:.0f} img/s "
              f"({rate['on'] / rate['off']:.2f}x), page faults per step "
              f"{faults['off']:.0f} -> {faults['on']:.0f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": "SGD steps, batch 64, one thread, channels_last; median of --reps runs",
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version()},
            "reps": args.reps, "seconds": args.seconds, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
