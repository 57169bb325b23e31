"""Run configs over several seeds on the bundled data; print mean ± std of top-1 and ECE.

    python tools/study.py configs/demo/vanilla.yaml configs/demo/kd.yaml configs/demo/cid.yaml \\
        --seeds 0 1 2 --teacher configs/demo/teacher.yaml

Each (config, seed) is the user's own command (``launch/train.py``) in a subprocess with
``--set seed=S`` and its own run directory, nested in MLflow under one parent run that also
receives the table and the mean of every cell. A finished run is not repeated (it resumes, or
returns at once), so an interrupted study continues where it stopped. ``--jobs N`` runs N of them
at a time (each with cores ÷ N CPU threads unless ``OMP_NUM_THREADS`` is set, its output in
``<run dir>/train.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.evaluate.report import format_table, mean_std, read_metrics, split_values  # noqa: E402
from pipeline.track.mlflow_tracker import Tracker  # noqa: E402


def train(cfg: str, run_dir: Path | None, overrides: list[str], jobs: int = 1) -> None:
    """One run: the user's command in a subprocess; its output here, or in its run directory
    when ``jobs`` > 1 (several runs at a time)."""
    cmd = [sys.executable, "launch/train.py", "--cfg", cfg]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if jobs == 1 or run_dir is None:
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
        return
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError(f"{run_dir.name} failed (exit {done.returncode}); end of {log}:\n"
                           + "\n".join(tail))
    print(f"finished {run_dir.name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="+", help="run configs (one table row each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher", help="teacher config trained first (once) if its run is missing")
    p.add_argument("--name", default="study", help="study name: runs/<name>/, MLflow parent run")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="report each run's last epoch (default) or its best epoch")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override for every run, e.g. --set optim.epochs=4")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    if args.teacher:
        train(args.teacher, None, [])  # its own default run directory, which students read
    first = load_run_config(args.configs[0], args.overrides, check_paths=False)
    splits = list(first.data.eval_splits)
    tracker = Tracker(first.tracking, enabled=True)
    parent = tracker.start(args.name, {"configs": args.configs, "seeds": args.seeds,
                                       "overrides": args.overrides}, {"study": "true"})
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, found {args.jobs}")
    runs = []
    for cfg in args.configs:
        label = Path(cfg).stem
        for seed in args.seeds:
            run_dir = ROOT / "runs" / args.name / f"{label}-s{seed}"
            extra = [f"seed={seed}", f"tracking.run_name={args.name}/{label}-s{seed}"]
            if parent:
                extra.append(f"tracking.parent_run_id={parent}")
            runs.append((label, cfg, run_dir, [*args.overrides, *extra]))
    with ThreadPoolExecutor(args.jobs) as pool:
        for _ in pool.map(lambda r: train(r[1], r[2], r[3], args.jobs), runs):
            pass
    rows: dict[str, list[dict[str, float]]] = {}
    for label, _, run_dir, _ in runs:
        rows.setdefault(label, []).append(split_values(read_metrics(run_dir), splits, args.which))

    table = format_table(rows, splits)
    print(f"\n{args.name}: {len(args.seeds)} seeds, {args.which} epoch")
    print(table)
    out = ROOT / "runs" / args.name
    (out / "table.txt").write_text(table + "\n")
    summary = {label: {k: mean_std([r[k] for r in seeds]) for k in seeds[0]}
               for label, seeds in rows.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics = {f"{label}/{k}/mean": v[0] for label, cells in summary.items()
               for k, v in cells.items()}
    tracker.log_metrics(metrics, 0)
    tracker.log_artifact(out / "table.txt")
    tracker.log_artifact(out / "summary.json")
    tracker.finish()
    print(f"study wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
