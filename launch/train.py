"""Train a teacher or distil a student: ``accelerate launch launch/train.py --cfg X.yaml``.

Re-running the same command resumes from the run directory's newest checkpoint.
``--dry-run`` builds everything the config describes and runs two steps on synthetic data shaped
like the real dataset (no dataset, teacher weights or tracking needed).
"""

from __future__ import annotations

import argparse
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
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from pipeline.train.signals import EXIT_REQUEUE
    from pipeline.train.trainer import Trainer

    try:
        if args.dry_run:
            with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
                spec = dry_run_spec(spec, tmp)
                trainer = Trainer(spec, load_teacher=False, config_text=dump_config(spec))
                trainer.fit()
                n = trainer.acc.num_processes
                trainer.acc.print(f"dry run of {args.cfg}: ok ({n} process(es))")
                trainer.acc.end_training()
            return 0
        trainer = Trainer(spec, config_text=dump_config(spec))
    except ConfigError as err:  # found while building: a refused cache, a missing split ...
        print(f"config error: {err}", file=sys.stderr)
        return 2
    result = trainer.fit()
    trainer.acc.end_training()
    if result.get("interrupted"):
        return EXIT_REQUEUE
    trainer.acc.print(
        f"done: best top1 {result.get('best_top1')}, last top1 {result.get('last_top1')} "
        f"→ {trainer.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
