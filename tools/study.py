"""Run a study: rows (configs) × a grid of overrides × seeds; print mean ± std of top-1 and ECE.

    # configs × seeds (each config is a row named by its file's stem)
    python tools/study.py configs/demo/vanilla.yaml configs/demo/kd.yaml configs/demo/cid.yaml \\
        --seeds 0 1 2 --teacher configs/demo/teacher.yaml
    # named rows with their own overrides, and a grid (cartesian product) applied to every row
    python tools/study.py --row cid=configs/demo/cid.yaml \\
        --row cid-T2=configs/demo/cid.yaml:method.T=2 \\
        --grid method.alpha=1,10,50 --grid method.beta=0.1,1 --seeds 0 1 --name cid-sweep

A **row** is a bare config (named by its stem) or ``--row NAME=CONFIG[:KEY=VALUE,...]``; rows may
share a name when their configs are other teacher-student pairs of one method (the report puts
them in one table row). ``--grid KEY=V1,V2,...`` (repeatable) crosses every row with every point
of the grid; a **cell** is one row at one grid point (``pipeline/evaluate/study_plan.py`` names
it: ``cid-alpha=10-beta=1``). Values are YAML as for ``--set``; commas inside brackets do not
split (``--grid optim.milestones=[5,7],[6,7]``). Every cell's config is loaded and checked before
anything runs.

Each (cell, seed) is the user's own command (``launch/train.py``) in a subprocess with
``--set seed=S``, the cell's overrides and its own run directory ``<out>/<cell>-s<seed>``, nested
in MLflow under one parent run (kept in ``<out>/study.json`` and reused when the study is run
again) that also receives the table and the mean of every cell. Every run is tagged for the
report (``tools/report.py``): ``study``, ``study_row``, ``study_cell``, ``study_label`` (row name
+ grid point), ``study_seed``, ``study_method``, ``study_pair`` (teacher→student),
``study_config``, ``study_overrides`` and ``study_grid``; the overrides are also in its params
(the resolved config). A run whose directory holds a finished run of the same config is skipped
without starting a process, so a half-finished study continues where it stopped (an unfinished
run resumes from its checkpoint; a changed config is refused by the trainer, naming the keys).
``--report`` then writes the study's paper-style report to ``<out>/report`` (``tools/report.py``,
columns ``--report-metrics``). ``--jobs N`` runs N at a time (each with cores ÷ N CPU threads
unless ``OMP_NUM_THREADS`` is set, its output in ``<run dir>/train.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError, dump_config  # noqa: E402
from pipeline.evaluate.labels import method_label, pair_label  # noqa: E402
from pipeline.evaluate.report import format_table, mean_std, read_metrics, split_values  # noqa: E402
from pipeline.evaluate.study_plan import (  # noqa: E402
    Study,
    cell_tags,
    config_row,
    parse_grid,
    parse_row,
    plan_cells,
    yaml_string,
)
from pipeline.track.mlflow_tracker import Tracker, resolve_uri  # noqa: E402
from pipeline.train.resume_guard import config_diff, latest_version  # noqa: E402


@dataclass
class Job:
    cell: str
    config: str
    run_dir: Path
    overrides: list[str]  # everything given to launch/train.py --set, tags included
    spec_text: str  # the resolved config (without tracking), to recognise a finished run


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


def finished(job: Job) -> bool:
    """The run directory holds a finished run (metrics.json) of this very config."""
    if not (job.run_dir / "metrics.json").is_file():
        return False
    _, old = latest_version(job.run_dir)
    return old is not None and not config_diff(old, job.spec_text)


def plan_jobs(study: Study, args: argparse.Namespace, out: Path) -> list[Job]:
    """Every (cell, seed), each config loaded and checked now (a bad key stops the study here)."""
    jobs = []
    for cell in plan_cells(study):
        for seed in args.seeds:
            overrides = [*args.overrides, *cell.overrides, f"seed={seed}"]
            spec = load_run_config(cell.row.config, overrides, check_paths=False)
            teacher = spec.teacher.arch if spec.teacher is not None else None
            tags = cell_tags(args.name, cell, seed, method_label(spec.method),
                             pair_label(teacher, spec.model.arch))
            extra = [f"tracking.run_name={args.name}/{cell.name}-s{seed}",
                     *(f"tracking.tags.{k}={yaml_string(v)}" for k, v in tags.items())]
            jobs.append(Job(cell.name, cell.row.config, out / f"{cell.name}-s{seed}",
                            [*overrides, *extra], dump_config(spec)))
    return jobs


def _exists(tracker: Tracker, record: dict) -> bool:
    """The recorded parent run is still in the store (a deleted store gets a new parent)."""
    try:
        tracker.client.get_run(record["parent_run_id"])  # type: ignore[union-attr]
    except Exception:  # not found, or the server is down: start a new parent
        return False
    return True


def start_parent(tracker: Tracker, out: Path, args: argparse.Namespace, study: Study) -> str | None:
    """The study's MLflow parent run: the one of an earlier start of this study, or a new one."""
    record = out / "study.json"
    uri = resolve_uri(tracker.spec) if tracker.enabled else None
    old = json.loads(record.read_text()) if record.is_file() else {}
    if old.get("parent_run_id") and old.get("tracking_uri") == uri and _exists(tracker, old):
        return tracker.start(args.name, {}, {}, resume_run_id=old["parent_run_id"])
    params = {"rows": [f"{r.name}={r.config}" + (":" + ",".join(r.overrides) if r.overrides
                                                   else "") for r in study.rows],
              "grid": [f"{k}={','.join(v)}" for k, v in study.grid],
              "seeds": args.seeds, "overrides": args.overrides}
    parent = tracker.start(args.name, params, {"study": "true", "study_name": args.name})
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}, indent=2))
    return parent


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Study]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", help="run configs (one row each, named by the stem)")
    p.add_argument("--row", dest="rows", action="append", default=[],
                   metavar="NAME=CONFIG[:KEY=VALUE,...]", help="a named row (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis (repeatable; cartesian product over the axes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher", help="teacher config trained first (once) if its run is missing")
    p.add_argument("--name", default="study", help="study name: runs/<name>/, MLflow parent run")
    p.add_argument("--out", type=Path, help="run directories and tables (default runs/<name>)")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="report each run's last epoch (default) or its best epoch")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override for every run, e.g. --set optim.epochs=4")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--report", action="store_true",
                   help="then write the paper-style report (tools/report.py) to <out>/report")
    p.add_argument("--report-metrics", default="top1,ece", help="its columns (default top1,ece)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, found {args.jobs}")
    try:
        study = Study([*map(config_row, args.configs), *map(parse_row, args.rows)],
                      [parse_grid(g) for g in args.grid])
    except ConfigError as err:
        p.error(str(err))
    return args, study


def summarise(jobs: list[Job], splits: list[str], which: str) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {}
    for job in jobs:
        rows.setdefault(job.cell, []).append(split_values(read_metrics(job.run_dir), splits,
                                                          which))
    return rows


def main(argv: list[str] | None = None) -> int:
    args, study = parse_args(argv)
    start = time.perf_counter()
    out = (args.out or ROOT / "runs" / args.name).resolve()
    try:
        jobs = plan_jobs(study, args, out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.teacher:  # trained in its own default run directory, which students read
        spec = load_run_config(args.teacher, check_paths=False)
        run_dir = ROOT / (spec.run_dir or f"runs/{spec.name}")
        if finished(Job("teacher", args.teacher, run_dir, [], dump_config(spec))):
            print(f"skip teacher {run_dir.name}: finished", flush=True)
        else:
            train(args.teacher, None, [])
    first = load_run_config(jobs[0].config, args.overrides, check_paths=False)
    splits = list(first.data.eval_splits)
    tracker = Tracker(first.tracking, enabled=True)
    parent = start_parent(tracker, out, args, study)
    todo = [j for j in jobs if not finished(j)]
    for j in jobs:
        if j not in todo:
            print(f"skip {j.run_dir.name}: finished", flush=True)
    if parent:
        for j in todo:
            j.overrides.append(f"tracking.parent_run_id={parent}")
    with ThreadPoolExecutor(args.jobs) as pool:
        for _ in pool.map(lambda j: train(j.config, j.run_dir, j.overrides, args.jobs), todo):
            pass
    rows = summarise(jobs, splits, args.which)
    table = format_table(rows, splits)
    print(f"\n{args.name}: {len(args.seeds)} seeds, {args.which} epoch "
          f"({len(jobs) - len(todo)} of {len(jobs)} runs were already finished)")
    print(table)
    (out / "table.txt").write_text(table + "\n")
    summary = {label: {k: mean_std([r[k] for r in seeds]) for k in seeds[0]}
               for label, seeds in rows.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    # MLflow metric names allow letters, digits and _-. :/ only (a cell name has = and +)
    tracker.log_metrics({re.sub(r"[^\w\-. :/]", "_", f"{label}/{k}/mean"): v[0]
                         for label, cells in summary.items() for k, v in cells.items()}, 0)
    tracker.log_artifact(out / "table.txt")
    tracker.log_artifact(out / "summary.json")
    tracker.finish()
    if args.report and tracker.enabled:
        subprocess.run([sys.executable, "tools/report.py", "--study", parent or args.name,
                        "--tracking-uri", resolve_uri(tracker.spec), "--title",
                        f"Study {args.name}", "--metrics", args.report_metrics,
                        "--out", str(out / "report")], cwd=ROOT, check=True)
    print(f"study wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
