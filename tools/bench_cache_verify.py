"""The cost of checking a teacher cache's checksums on first read, against an epoch.

    python tools/bench_cache_verify.py --json benchmarks/results/cache_verify.json

A synthetic cache with ImageNet's row sizes (full fp16 logits of 1000 classes and a 512-d fp16
embedding: 3,024 bytes per sample and view) over ``--samples`` samples, one view, chunks of
4096, its completion markers holding real checksums. Timed, in the same run, each repeat in a
rotated order (so load from other processes on the machine hits all alike):

- ``read``: one epoch of the cached teacher as training reads it (``CachedTeacher.lookup`` of
  shuffled batches of ``--batch`` samples, float32 tensors out) with the verifier switched off;
- ``read_verify``: the same epoch from a fresh reader: every (chunk, array) is hashed the
  first time it is read (``pipeline/teacher/cache_verify.py``), i.e. the whole view once;
- ``train_step``: one distillation step of a ResNet-18 student (64 px, batch ``--batch``,
  1000 classes: forward, KD + CE on the cached logits, backward, SGD) on this machine; an
  epoch of those over the same samples is ``ceil(samples / batch)`` steps.

Reported: seconds per epoch of each, the verification overhead (``read_verify − read``), its
ratio to the read epoch and to the training epoch (``overhead_over_train_epoch``: what the
first epoch of each view pays; later epochs of that view pay nothing), the sha256 throughput,
and a projection for ImageNet (1,281,167 samples: seconds per process and view at the measured
throughput). The page cache is warmed first, so disk speed is not measured. Times are process
CPU time (other processes sharing the cores disturb it far less than wall time; wall time is
in the JSON too); figures are medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.teacher.cache_format import (  # noqa: E402
    ArraySpec,
    Manifest,
    create_arrays,
    open_arrays,
    unit_checksums,
    write_marker,
)
from pipeline.teacher.cached import CachedTeacher, CacheReader  # noqa: E402

IMAGENET_SAMPLES = 1_281_167


def make_cache(root: Path, samples: int, classes: int, dim: int, chunk: int) -> Manifest:
    """A one-view cache of random fp16 rows with valid completion markers."""
    manifest = Manifest(
        teacher={"arch": "bench", "weights": None, "sha256": None, "num_classes": classes,
                 "embedding_dim": dim, "preact": False},
        dataset={"fingerprint": "bench", "kind": "bench", "split": "train",
                 "num_samples": samples},
        plan={}, eval_transform=None, normalize={"mean": [0.0] * 3, "std": [1.0] * 3},
        views=1, eval_view=False, chunk=chunk, fields=["logits", "embedding"],
        logits={"mode": "full"},
        arrays={"logits": ArraySpec("train", "float16", [classes]),
                "embedding": ArraySpec("train", "float16", [dim])},
        precision="fp32",
    )
    create_arrays(root, manifest)
    (root / "done").mkdir()
    arrays = open_arrays(root, manifest, "r+")
    rng = np.random.default_rng(0)
    for unit in manifest.units():
        start, stop = manifest.row_range(unit)
        for arr in arrays.values():
            arr[start:stop] = rng.standard_normal((stop - start, arr.shape[1]), np.float32)
            arr.flush()
        write_marker(root, manifest, unit, unit_checksums(arrays, manifest, unit), [], 0)
    manifest.save(root)
    return manifest


def read_epoch(root: Path, batch: int, verify: bool) -> int:
    """One epoch of lookups from a fresh reader; returns the bytes the verifier hashed."""
    reader = CacheReader(root)
    if not verify:
        reader.verifier.check = lambda *args: None  # type: ignore[method-assign]
    teacher = CachedTeacher(reader, ("logits", "embedding"), [0])
    order = np.random.default_rng(1).permutation(reader.num_samples)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        teacher.lookup(idx, np.zeros_like(idx))
    return reader.verifier.bytes_hashed


def train_step_fn(batch: int, classes: int) -> Callable[[], None]:
    from pipeline.models import build_model

    torch.manual_seed(0)
    student = build_model("resnet18", classes).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(batch, 3, 64, 64)
    labels = torch.randint(0, classes, (batch,))
    teacher_logits = torch.randn(batch, classes)

    def step() -> None:
        out = student(images)
        kd = F.kl_div(F.log_softmax(out.logits / 4, 1), F.softmax(teacher_logits / 4, 1),
                      reduction="batchmean") * 16
        loss = 0.1 * F.cross_entropy(out.logits, labels) + 0.9 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=40_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=4, help="timed student steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-cache-verify-") as tmp:
        root = Path(tmp)
        manifest = make_cache(root, args.samples, args.classes, args.dim, args.chunk)
        view_bytes = sum(np.load(root / f"{n}.npy", mmap_mode="r").nbytes for n in manifest.arrays)
        read_epoch(root, args.batch, verify=False)  # warm the page cache
        step = train_step_fn(args.batch, args.classes)
        step()  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {"read": [], "read_verify": [],
                                                      "train_step": []}
        hashed = 0
        modes = list(runs)
        for r in range(args.repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:
                if mode == "train_step":
                    cpu, wall, _ = timed(lambda: [step() for _ in range(args.train_steps)])
                    runs[mode].append((cpu / args.train_steps, wall / args.train_steps))
                else:
                    cpu, wall, n = timed(lambda m=mode: read_epoch(root, args.batch,
                                                                    m == "read_verify"))
                    runs[mode].append((cpu, wall))
                    hashed = max(hashed, n)
    med = {m: statistics.median(c for c, _ in v) for m, v in runs.items()}
    med_wall = {m: statistics.median(w for _, w in v) for m, v in runs.items()}
    steps = math.ceil(args.samples / args.batch)
    train_epoch = med["train_step"] * steps
    overhead = max(med["read_verify"] - med["read"], 0.0)
    throughput = hashed / overhead if overhead > 0 else float("inf")
    per_sample = view_bytes / args.samples
    imagenet_s = IMAGENET_SAMPLES * per_sample / throughput
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": 1,
        "clock": "process CPU time (wall in *_wall_s)",
        "samples": args.samples, "classes": args.classes, "embedding_dim": args.dim,
        "chunk": args.chunk, "batch": args.batch, "repeats": args.repeats,
        "view_bytes": view_bytes, "bytes_hashed": hashed,
        "read_epoch_s": med["read"], "read_verify_epoch_s": med["read_verify"],
        "train_step_s": med["train_step"], "train_epoch_s": train_epoch,
        "read_epoch_wall_s": med_wall["read"], "read_verify_epoch_wall_s":
            med_wall["read_verify"], "train_step_wall_s": med_wall["train_step"],
        "verify_overhead_s": overhead,
        "overhead_over_read_epoch": overhead / med["read"],
        "overhead_over_train_epoch": overhead / train_epoch,
        "sha256_mb_per_s": throughput / 1e6,
        "imagenet_projection": {
            "samples": IMAGENET_SAMPLES, "bytes_per_view": IMAGENET_SAMPLES * per_sample,
            "verify_s_per_process_and_view": imagenet_s,
            "note": "each process hashes every chunk it reads: with shuffled batches, the "
                    "whole view, once, in the first epoch that uses the view",
        },
        "raw": {m: [list(x) for x in v] for m, v in runs.items()},
    }
    print(f"cache of {args.samples} samples × {per_sample:.0f} B ({view_bytes / 1e6:.0f} MB): "
          f"read epoch {med['read']:.2f} s, with checksums {med['read_verify']:.2f} s "
          f"(+{overhead:.2f} s = {overhead / med['read']:.2f}× the read epoch, "
          f"{100 * overhead / train_epoch:.2f} % of a {train_epoch:.0f} s ResNet-18 training "
          f"epoch); sha256 {throughput / 1e6:.0f} MB/s; ImageNet: {imagenet_s:.1f} s per "
          "process and view")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
