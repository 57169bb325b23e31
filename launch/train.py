"""Train a teacher or distil a student: ``accelerate launch launch/train.py --cfg X.yaml``.

Re-running the same command resumes from the run directory's newest checkpoint (refused if the
config differs from the one the run directory was started with: pipeline/train/resume_guard.py).
``--dry-run`` builds everything the config describes and runs two steps on synthetic data shaped
like the real dataset (no dataset, teacher weights or tracking needed), then lists what it
checked of the real run and what not (pipeline/train/preflight.py).

Exit status: 0 done, 2 config error (the message names the file, the key and what is allowed;
no traceback), 75 stopped by a signal after a checkpoint (requeue).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError, dump_config  # noqa: E402
from pipeline.config.schema import RunSpec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML run config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.epochs=2 (repeatable)",
    )
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="two steps on synthetic data shaped like the config's dataset",
    )
    return p.parse_args(argv)


PHASE_EPOCH_OPTIONS = ("init_epochs", "paraphraser_epochs")  # AB's and FT's initial phases


def dry_run_spec(spec: RunSpec, run_dir: str) -> RunSpec:
    """The same run on a few synthetic samples: 1 epoch (and 1 per initial phase), 2 steps of
    batch 2 per process."""
    d = spec.data
    d.dataset = "synthetic"
    d.backend = "torchvision"
    d.batch_size = d.eval_batch_size = 2
    d.workers = 0
    d.synthetic_size = 8
    d.eval_splits = d.eval_splits[:1]
    d.drop_classes = [c for c in d.drop_classes if c < (d.num_classes or 10)]  # synthetic classes
    spec.optim.epochs = 1
    spec.optim.milestones = []
    spec.train.max_steps_per_epoch = 2
    spec.train.progress = False
    spec.tracking.enabled = False
    spec.run_dir = run_dir
    if spec.teacher is not None:
        spec.teacher.source = "online"
    # One epoch leaves no room for a method's warm-up (IPWD and CID refuse warmup >= epochs):
    # set explicit warm-ups to 0, so the dry run also takes the method's main path.
    opts = getattr(spec, "method_options", None)
    for o in [opts, *getattr(opts, "terms", {}).values()]:
        if getattr(o, "warmup_epochs", 0) > 0:
            o.warmup_epochs = 0
        for key in PHASE_EPOCH_OPTIONS:  # initial phases: one epoch each, then the main one
            if getattr(o, key, 0) > 1:
                setattr(o, key, 1)
    from pipeline.data.coss_sampler import dry_run_sampler

    dry_run_sampler(d, run_dir)  # CoSS batches: random neighbour lists for the synthetic samples
    return spec


def config_error(err: Exception) -> int:
    """Print a config error (no traceback) and return its exit status, 2."""
    print(f"config error: {err}", file=sys.stderr, flush=True)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION") is not None
    if launched and os.environ.get("RANK", "0") == "0":
        # accelerate's launcher raises (CalledProcessError for one process, torchrun's
        # ChildFailedError for several) whenever a process exits non-zero
        print("(a traceback that accelerate's launcher prints after this line is its own, "
              "and its exit status 1: the error is the line above; with one process "
              "`accelerate launch -q ...` leaves the traceback out)", file=sys.stderr, flush=True)
    return 2


def cpu_precision(spec: RunSpec) -> list:
    """Without CUDA the dry run steps in fp32: CPUs emulate bf16/fp16 convolutions (measured 3.5×
    slower for a ResNet-18 step), and what a dry run checks, the build and the method's code
    path, does not depend on it. Returns the report line saying so (the device check,
    tools/device_check.py, runs the configs in bf16 and fp16 on a GPU)."""
    import torch

    from pipeline.train.preflight import Finding

    precision = spec.train.mixed_precision
    if precision == "no" or torch.cuda.is_available() or spec.train.cpu:
        return []
    spec.train.mixed_precision = "no"
    return [Finding("not checked", "train.mixed_precision",
                    f"{precision} needs CUDA to be fast; this CPU dry run stepped in fp32")]


def dry_run(spec: RunSpec, cfg: str) -> int:
    """The dry run: build, two synthetic steps, then the checks of the real run."""
    from pipeline.train.preflight import preflight, report
    from pipeline.train.trainer import Trainer

    findings = preflight(spec)  # before dry_run_spec replaces the data with synthetic data
    findings += cpu_precision(spec)
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        spec = dry_run_spec(spec, tmp)
        trainer = Trainer(spec, load_teacher=False, config_text=dump_config(spec))
        trainer.fit()
        n = trainer.acc.num_processes
        errors = [f for f in findings if f.status == "error"]
        missing = [f for f in findings if f.status == "missing"]
        verdict = ("builds and runs" if not errors else
                   f"builds and runs, but {len(errors)} error(s) would stop the real run")
        tail = f"; {len(missing)} path(s) not on this machine" if missing else ""
        trainer.acc.print(f"dry run of {cfg}: the config {verdict} ({n} process(es), two steps "
                          f"on synthetic data){tail}\n{report(findings)}")
        trainer.acc.end_training()
    return 2 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.train.signals import STOP

    STOP.install()
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    try:
        spec = load_run_config(args.cfg, overrides, check_paths=not args.dry_run)
    except ConfigError as err:
        return config_error(err)

    from pipeline.train.signals import EXIT_REQUEUE
    from pipeline.train.trainer import Trainer

    try:
        if args.dry_run:
            return dry_run(spec, args.cfg)
        trainer = Trainer(spec, config_text=dump_config(spec))
        # found while training: a teacher-cache chunk whose checksum fails on first read
        result = trainer.fit()
    except ConfigError as err:  # found while building: a refused cache, a missing split ...
        return config_error(err)
    trainer.acc.end_training()
    if result.get("interrupted"):
        return EXIT_REQUEUE
    trainer.acc.print(
        f"done: best top1 {result.get('best_top1')}, last top1 {result.get('last_top1')} "
        f"→ {trainer.run_dir}"
    )
    url = trainer.tracker.run_url()
    if url and trainer.acc.is_main_process:
        print(f"MLflow run: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
