"""The study behind the demo's recipe: how many epochs the teacher and the students train.

    python tools/demo_recipe.py --seeds 0 1 2 --json benchmarks/results/demo_recipe.json

The rule, fixed before any result (issue: "a recipe chosen by a rule stated in advance, not by
outcome"); the data, ρ and every other setting stay as in ``configs/_base/demo.yaml``, and the
learning-rate milestones scale with the epochs (at 5/8 and 7/8 of them, as in the 8-epoch base):

- **teacher** (resnet20, CE): start at 8 epochs and double while doubling raises the mean over
  seeds of the last-epoch ``test_unbiased`` top-1 by 1 point or more; the teacher trains for the
  first length at which it does not (it has reached its plateau on the unbiased split);
- **students**: the vanilla resnet8 student, the same way, on its mean training loss over the last
  epoch: double while doubling lowers it by 10 % or more (relative). Every student of the demo
  (vanilla, KD, CID, IPWD) then uses that length, the same teacher and the same recipe.
The lengths are capped by the demo's budget of 10 minutes on a quiet 2-core machine: students at
``--max-epochs`` (32: 4 students × 64 epochs alone would take ~11 minutes there), the teacher at
``--max-teacher-epochs`` (16: its epochs cost twice a student's). Each candidate is a user
command (``launch/train.py``) with its own run directory under ``runs/demo-recipe/``; finished
ones are not re-run. Training losses are read back from MLflow (the per-step ``train/loss`` of
the run's last epoch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (its thread setup must precede torch's OpenMP)

TEACHER_GAIN = 1.0  # points of test_unbiased top-1 that doubling must add to go on
LOSS_DROP = 0.10  # relative fall of the vanilla training loss that doubling must bring to go on


def milestones(epochs: int) -> list[int]:
    return sorted({max(1, round(epochs * 5 / 8)), max(1, round(epochs * 7 / 8))})


def recipe_overrides(epochs: int) -> list[str]:
    return [f"optim.epochs={epochs}", f"optim.milestones={milestones(epochs)}"]


def train(cfg: str, run_dir: Path, epochs: int, seed: int) -> dict:
    if not (run_dir / "metrics.json").is_file():
        cmd = [sys.executable, "launch/train.py", "--cfg", cfg, "--run-dir", str(run_dir),
               "--set", f"seed={seed}", "--set", "train.progress=false",
               "--set", f"tracking.run_name=demo-recipe/{run_dir.name}"]
        for o in recipe_overrides(epochs):
            cmd += ["--set", o]
        print("$", " ".join(cmd), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "train.log").open("a") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((run_dir / "metrics.json").read_text())


def last_epoch_train_loss(run_dir: Path, epochs: int) -> float:
    """Mean of the logged ``train/loss`` values of the run's last epoch (from MLflow)."""
    from mlflow.tracking import MlflowClient

    from pipeline.track.mlflow_tracker import default_uri

    info = json.loads((run_dir / "run_info.json").read_text())
    history = MlflowClient(default_uri()).get_metric_history(info["mlflow_run_id"], "train/loss")
    steps_per_epoch = max(m.step for m in history) // epochs
    last = [m.value for m in history if m.step > (epochs - 1) * steps_per_epoch]
    return statistics.fmean(last)


def search(name: str, cfg: str, seeds: list[int], max_epochs: int, score, better) -> dict:
    """Double the epochs from 8 while ``better(previous score, score)``; the scores per length."""
    table: dict[int, dict] = {}
    epochs = 8
    while True:
        values = []
        for seed in seeds:
            run_dir = ROOT / "runs" / "demo-recipe" / f"{name}-e{epochs}-s{seed}"
            metrics = train(cfg, run_dir, epochs, seed)
            values.append(score(run_dir, metrics, epochs))
        table[epochs] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values}
        print(f"{name} {epochs} epochs: {table[epochs]['mean']:.3f} ± {table[epochs]['std']:.3f}",
              flush=True)
        previous = table.get(epochs // 2)
        if previous is not None and not better(previous["mean"], table[epochs]["mean"]):
            return {"chosen_epochs": epochs // 2, "candidates": table}
        if epochs * 2 > max_epochs:
            return {"chosen_epochs": epochs, "candidates": table, "capped": True}
        epochs *= 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=32, help="cap of the students' search")
    p.add_argument("--max-teacher-epochs", type=int, default=16, help="cap of the teacher's")
    p.add_argument("--only", choices=["teacher", "students"],
                   help="one of the two searches (they are independent: run both at once)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    start = time.perf_counter()
    result: dict = {
        "rule": {"teacher": f"double from 8 epochs while +{TEACHER_GAIN} point test_unbiased",
                 "students": f"double from 8 epochs while vanilla train loss falls "
                             f">= {LOSS_DROP:.0%}",
                 "milestones": "5/8 and 7/8 of the epochs"},
        "seeds": args.seeds,
    }
    if args.only != "students":
        result["teacher"] = search(
        "teacher", "configs/demo/teacher.yaml", args.seeds, args.max_teacher_epochs,
        lambda d, m, e: m["last"]["test_unbiased/top1"],
        lambda prev, cur: cur - prev >= TEACHER_GAIN)
    if args.only != "teacher":
        result["students"] = search(
        "vanilla", "configs/demo/vanilla.yaml", args.seeds, args.max_epochs,
        lambda d, m, e: last_epoch_train_loss(d, e),
        lambda prev, cur: (prev - cur) / prev >= LOSS_DROP)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: v["chosen_epochs"] for k, v in result.items() if isinstance(v, dict)
                      and "chosen_epochs" in v}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
