"""`make demo`: the shortcut a teacher removes, and the methods that pass it on.

The bundled data are colour-biased MNIST digits: in the training set and ``test_biased`` the
background colour gives the label away in 80 % of the images, in ``test_unbiased`` it says
nothing. A network that learns the colour rule scores about 80 % biased and 10 % unbiased; one
that learns the digits scores high on both. The demo runs the pipeline as a user would:

1. train the teacher (resnet20, cross-entropy) until it has left the shortcut;
2. write the teacher cache: its outputs for K augmentation views of every training sample;
3. train the resnet8 students (vanilla, KD, CID, IPWD) from that cache, all with one recipe;
4. print one table (last epoch; mean ± std over seeds) and draw the figure, both logged to MLflow.

Every stage is the user's own command (printed before it runs); a finished stage is skipped on a
second run (its run directory holds metrics.json; a complete cache is not rewritten). Stages run
side by side as soon as what they read exists (``Schedule``), each with its share of the cores as
threads: one-thread processes next to each other use two cores better than one two-thread
process (3-epoch vanilla runs on the reference machine: one with two threads 32.8 s, two with one
thread each side by side 35.5 s for both). The recipe
(epochs, K) comes from ``tools/demo_recipe.py``: a study over 3 seeds with a rule fixed in advance
(``benchmarks/results/demo_recipe.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (its thread setup must precede torch's OpenMP)

# isort: split
from pipeline.evaluate.report import format_table, read_metrics, split_values  # noqa: E402

# The recipe (tools/demo_recipe.py, benchmarks/results/demo_recipe.json).
TEACHER_EPOCHS = 16
STUDENT_EPOCHS = 32
EVAL_EVERY = 4
VIEWS = 8  # cached augmentation views per sample (epoch e reads view e mod K)
CACHE_FIELDS = "[logits,embedding]"  # what KD, CID and IPWD read between them
STUDENTS = [("vanilla", "configs/demo/vanilla.yaml"), ("KD", "configs/demo/kd.yaml"),
            ("CID", "configs/demo/cid.yaml"), ("IPWD", "configs/demo/ipwd.yaml")]
SPLITS = ("test_unbiased", "test_biased")
OUT = ROOT / "runs" / "demo"
# Expected seconds of each stage in the default schedule on this project's 2-core reference
# machine (a quiet fresh-clone `make demo`, benchmarks/results/demo_results.json): the teacher
# beside the vanilla student, one thread each; the cache alone; the three cached students at once.
# Rescaled while the demo runs by how its finished stages went.
TEACHER_S, VANILLA_S, CACHE_S, CACHED_STUDENT_S = 229.0, 182.0, 31.0, 312.0


def milestones(epochs: int) -> str:
    return str(sorted({max(1, round(epochs * 5 / 8)), max(1, round(epochs * 7 / 8))}))


def recipe(epochs: int) -> list[str]:
    # Scored every EVAL_EVERY epochs (and at the last): the curves keep their shape, and the
    # students spend their time training.
    return [f"optim.epochs={epochs}", f"optim.milestones={milestones(epochs)}",
            f"train.eval_every={EVAL_EVERY}", "train.progress=false"]


@dataclass
class Stage:
    label: str
    cmd: list[str]
    done: Path  # exists once the stage has finished
    expected_s: float  # as measured on the reference machine, in the demo's schedule
    overrides: list[str] = field(default_factory=list)
    after: list[Path] = field(default_factory=list)  # the `done` files of the stages it reads


def stages(seeds: list[int], extra: list[str]) -> list[Stage]:
    """Every stage, in the order they start when cores are free: the teacher and the stages that
    do not read it first, so that they run side by side."""
    teacher_dir = OUT / "teacher"
    teacher_done = teacher_dir / "metrics.json"
    teacher_weights = f"teacher.weights={teacher_dir / 'student.pt'}"
    plan = [Stage("train the teacher (resnet20, CE)",
                  ["launch/train.py", "--cfg", "configs/demo/teacher.yaml",
                   "--run-dir", str(teacher_dir)], teacher_done,
                  TEACHER_S,
                  [*recipe(TEACHER_EPOCHS), "seed=0", "tracking.run_name=demo/teacher", *extra])]
    later: list[Stage] = []
    for seed in seeds:
        cache = OUT / f"teacher-cache-s{seed}-K{VIEWS}"
        cached = [teacher_weights, f"data.views={VIEWS}", f"teacher.cache_dir={cache}",
                  f"seed={seed}"]
        later.append(Stage(f"cache the teacher's outputs, {VIEWS} views (seed {seed})",
                           ["launch/cache_teacher.py", "--cfg", "configs/demo/kd.yaml"],
                           cache / "manifest.json", CACHE_S,
                           [*cached, f"teacher.cache_fields={CACHE_FIELDS}", *extra],
                           [teacher_done]))
        for name, cfg in STUDENTS:
            run_dir = OUT / f"{name.lower()}-s{seed}"
            teacher = [] if name == "vanilla" else [*cached, "teacher.source=cached"]
            student = Stage(
                f"train the {name} student (resnet8, seed {seed})",
                ["launch/train.py", "--cfg", cfg, "--run-dir", str(run_dir)],
                run_dir / "metrics.json", VANILLA_S if name == "vanilla" else CACHED_STUDENT_S,
                [*recipe(STUDENT_EPOCHS), f"seed={seed}", *teacher,
                 f"tracking.run_name=demo/{name.lower()}-s{seed}", *extra],
                [] if name == "vanilla" else [cache / "manifest.json"])
            (plan if name == "vanilla" else later).append(student)
    return plan + later


def default_jobs() -> int:
    """Stages run at once: one per core, and three on two cores, where the three cached
    students, equally long, then share the cores and finish together."""
    cores = os.cpu_count() or 1
    return 3 if cores == 2 else max(cores, 1)


class Schedule:
    """Runs the stages, up to ``jobs`` at a time, each once the stages it reads have finished;
    each running stage gets an equal share of the cores as its CPU threads. Prints each start
    with its expected time, scaled by how the finished stages went."""

    def __init__(self, plan: list[Stage], jobs: int, cores: int) -> None:
        self.plan, self.jobs, self.cores = plan, jobs, cores
        self.expected = self.taken = 0.0
        self.running: dict[int, tuple[subprocess.Popen, float, int]] = {}

    def run(self) -> None:
        waiting = list(range(len(self.plan)))
        while waiting or self.running:
            ready = [i for i in waiting if self._readable(i)]
            while ready and len(self.running) < self.jobs:
                share = min(self.jobs, len(self.running) + len(ready))
                i = ready.pop(0)
                waiting.remove(i)
                self._start(i, max(1, self.cores // share))
            if self.running:
                self._wait_one()
            elif waiting and not any(self._readable(i) for i in waiting):
                names = ", ".join(self.plan[i].label for i in waiting)
                raise SystemExit(f"demo: cannot start {names}: what they read is missing")

    def _readable(self, i: int) -> bool:
        return all(p.exists() for p in self.plan[i].after)

    def _start(self, i: int, threads: int) -> None:
        stage, n, total = self.plan[i], i + 1, len(self.plan)
        head = f"[{n}/{total}] {stage.label}"
        if stage.done.exists():
            print(f"{head}: done already ({stage.done.relative_to(ROOT)})", flush=True)
            return
        scale = self.taken / self.expected if self.expected else 1.0
        print(f"{head}: expected ~{stage.expected_s * scale:.0f} s "
              f"({threads} thread{'s' if threads > 1 else ''})", flush=True)
        cmd = [sys.executable, *stage.cmd]
        for o in stage.overrides:
            cmd += ["--set", o]
        print("  $", " ".join(c if " " not in c else repr(c) for c in cmd[1:]), flush=True)
        log = OUT / "logs" / f"{n:02d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.running[i] = (proc, time.perf_counter(), threads)

    def _wait_one(self) -> None:
        while True:
            for i, (proc, start, threads) in list(self.running.items()):
                if proc.poll() is not None:
                    del self.running[i]
                    self._finished(i, proc.returncode, time.perf_counter() - start, threads)
                    return
            time.sleep(0.2)

    def _finished(self, i: int, code: int, taken: float, threads: int) -> None:
        stage, log = self.plan[i], OUT / "logs" / f"{i + 1:02d}.log"
        if code != 0:
            for proc, _, _ in self.running.values():
                proc.terminate()
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise SystemExit(f"{stage.label} failed (exit {code}); {log}:\n{tail}")
        self.expected += stage.expected_s
        self.taken += taken
        print(f"[{i + 1}/{len(self.plan)}] {stage.label}: took {taken:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="student seeds (0 … N-1; default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra config override for every stage")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="stages run at once (default: one per core, three on two cores)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected >= 1, found {args.seeds}")
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, found {args.jobs}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", "data/demo"],
                   cwd=ROOT, check=True)
    seeds = list(range(args.seeds))
    Schedule(stages(seeds, args.overrides), args.jobs, os.cpu_count() or 1).run()
    rows = {f"teacher (resnet20, {TEACHER_EPOCHS} ep)":
            [split_values(read_metrics(OUT / "teacher"), SPLITS)]}
    for name, _ in STUDENTS:
        rows[f"{name} resnet8 ({STUDENT_EPOCHS} ep)"] = [
            split_values(read_metrics(OUT / f"{name.lower()}-s{s}"), SPLITS) for s in seeds]
    table = format_table(rows, SPLITS)
    summarise(rows, table, seeds, time.perf_counter() - start)
    return 0


def summarise(rows: dict, table: str, seeds: list[int], wall_s: float) -> None:
    from pipeline.evaluate.demo_figure import draw_demo_figure

    figure = OUT / "demo_results.png"
    bias = json.loads((ROOT / "data/demo/manifest.json").read_text())["bias"]
    draw_demo_figure(rows, SPLITS, figure, {s: 100.0 * bias[s] for s in SPLITS if s in bias})
    (OUT / "table.txt").write_text(table + "\n")
    (OUT / "results.json").write_text(json.dumps(
        {"seeds": seeds, "teacher_epochs": TEACHER_EPOCHS, "student_epochs": STUDENT_EPOCHS,
         "views": VIEWS, "rows": rows, "wall_s": round(wall_s, 1)}, indent=2) + "\n")
    run_id = log_summary(figure, seeds)
    print()
    print("Colour-biased MNIST: background colour = label in 80 % of train and test_biased images,")
    print("independent in test_unbiased. A colour rule scores ~10 % unbiased / ~80 % biased.")
    print(f"Last epoch, {len(seeds)} seed(s) (mean ± std over seeds when more than one):")
    print(table)
    print(f"\nfigure: {figure.relative_to(ROOT)}   table: {(OUT / 'table.txt').relative_to(ROOT)}")
    print(f"demo wall time: {wall_s:.0f} s")
    where = f" (run {run_id}, experiment demo)" if run_id else ""
    print(f"Open the runs in MLflow{where}:\n  .venv/bin/mlflow ui --backend-store-uri "
          f"sqlite:///{ROOT / 'mlruns.db'}")


def log_summary(figure: Path, seeds: list[int]) -> str | None:
    from pipeline.catalog import load_run_config
    from pipeline.track.mlflow_tracker import Tracker

    spec = load_run_config(str(ROOT / "configs/demo/vanilla.yaml"), [], check_paths=False)
    tracker = Tracker(spec.tracking, enabled=spec.tracking.enabled)
    run_id = tracker.start("demo/summary", {"seeds": seeds, "teacher_epochs": TEACHER_EPOCHS,
                                            "student_epochs": STUDENT_EPOCHS, "views": VIEWS},
                           {"demo": "summary"})
    for path in (figure, OUT / "table.txt", OUT / "results.json"):
        tracker.log_artifact(path)
    tracker.finish()
    return run_id


if __name__ == "__main__":
    sys.exit(main())
