"""Stages that time or check the training step: throughput against a bare loop, sync-free."""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from devcheck.common import Context

PAIR = "imagenet_resnet34_resnet18_224px"
# Issue 12's goals for R34 → R18 at 224 px bf16 on one H200 (reported, not asserted).
GOALS = {"student_only_images_per_s": 12000.0, "cached_over_student_only": 0.9,
         "within_of_bare": 1.03}


def throughput(ctx: Context) -> dict[str, Any]:
    """tools/bench_distill.py on the device: student-only, cached and online steps of our
    trainer and the bare loop, in-memory batches, bf16 channels-last at 224 px (on a GPU)."""
    import bench_distill

    argv = ["--device", ctx.device, "--pairs", PAIR,
            "--steps", str(ctx.pick(10, 2)), "--repeats", str(ctx.pick(5, 1)),
            "--warmup", str(ctx.pick(2, 1))]
    if ctx.quick:
        argv += ["--batch", "4", "--size", "32"]
    out = bench_distill.run(bench_distill.parser().parse_args(argv))
    pair = out["pairs"][PAIR]
    ips = pair["images_per_s"]
    goals: dict[str, Any] = {}
    if ctx.cuda:
        limit = GOALS["within_of_bare"]
        goals = {
            "student_only_ge_12k_img_s": ips["student_only"] >= GOALS["student_only_images_per_s"],
            "cached_ge_0.9_student_only":
                1.0 / pair["cached_over_student_only"] >= GOALS["cached_over_student_only"],
            "online_within_3pct_of_bare": pair["online_vs_bare"] <= limit,
            "cached_within_3pct_of_bare_student": pair["cached_vs_bare_student"] <= limit,
            "student_only_within_3pct_of_bare": pair["student_only_vs_bare_student"] <= limit,
        }
    summary = {"images_per_s": {k: round(v, 1) for k, v in ips.items()},
               "online_vs_bare": pair["online_vs_bare"],
               "cached_vs_bare_student": pair["cached_vs_bare_student"],
               "student_only_vs_bare_student": pair["student_only_vs_bare_student"],
               "cached_images_over_student_only": 1.0 / pair["cached_over_student_only"]}
    return {"results": {"summary": summary, "bench": out}, "goals": goals,
            "checks": {"all_modes_ran": len(ips) == 6}}


def _spec(root: Path, mode: str, precision: str, ctx: Context, steps: int) -> Any:
    import bench_distill

    pair = {**bench_distill.PAIRS[PAIR]}
    if ctx.quick:
        pair.update(batch=4, size=32)
    return bench_distill.make_spec(pair, root, mode, steps, not ctx.cuda, precision, ctx.cuda)


def sync_free(ctx: Context) -> dict[str, Any]:
    """Our trainer's steady-state steps under ``torch.cuda.set_sync_debug_mode("error")``:
    student-only (bf16, fp16 with the grad scaler), KD online and cached (bf16). On a CPU the
    same steps run unchecked, in float32 and without the fp16 case."""
    import torch
    from accelerate.state import AcceleratorState

    from pipeline.data import AugPlan, build_index
    from pipeline.data.loader import build_train_loader
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.train.hot_loop import sync_checked
    from pipeline.train.trainer import Trainer

    steps, first, stop = 8, 4, 7
    low = "bf16" if ctx.cuda else "no"  # a CPU without bf16 units takes seconds per step
    cases = [("student_only", low), ("online", low), ("cached", low)]
    if ctx.cuda:  # the grad scaler's path (fp16 runs without a scaler on a CPU)
        cases.insert(1, ("student_only", "fp16"))
    results, checks = {}, {}
    with tempfile.TemporaryDirectory(prefix="devcheck-sync-") as tmp:
        root = Path(tmp)
        from pipeline.models import build_model

        torch.manual_seed(0)
        torch.save(build_model("resnet34", 1000).state_dict(), root / "teacher.pt")
        for mode, precision in cases:
            name = f"{mode}/{precision}"
            t0 = time.perf_counter()
            try:
                spec = _spec(root, mode, precision, ctx, steps)
                if mode == "cached" and not (root / "cache" / "manifest.json").exists():
                    write_cache(spec, ("logits",), device=ctx.device, progress=False)
                d = spec.data
                plan = AugPlan.from_spec(d, spec.seed)
                batches = list(build_train_loader(build_index(d, d.train_split), d, plan, 0,
                                                  spec.seed, 0, 1))
                AcceleratorState._reset_state(reset_partial_state=True)  # another precision
                trainer = Trainer(spec)
                trainer._train_loader = (  # type: ignore[method-assign]
                    lambda epoch, start, b=batches: sync_checked(b, first, stop))
                trainer._train_epoch(0, 0, 0)
                results[name] = {"ok": True, "checked_steps": stop - first if ctx.cuda else 0}
            except Exception:  # a sync raises here: report it, go on with the other cases
                results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            results[name]["seconds"] = round(time.perf_counter() - t0, 2)
            checks[name] = results[name]["ok"]
    return {"results": {"sync_debug_mode": "error" if ctx.cuda else "not available (CPU)",
                        "cases": results}, "checks": checks}
