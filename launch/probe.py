"""Evaluate a trained student's embedding by linear probe and weighted k-NN.

    python launch/probe.py --run-dir runs/demo-coss
    python launch/probe.py --run-dir runs/cifar100-wrn_40_2-wrn_16_2-coss --epochs 100

Reads ``<run-dir>/config.yaml`` and ``<run-dir>/student.pt`` (written by launch/train.py),
extracts the frozen student's pooled embedding of the training split and of every eval split
(eval transform), trains a linear classifier on the training features (the CoSS CIFAR recipe:
SGD LR 0.1, milestones 50/70/90 of 100 epochs, wd 5e-4, batch 128; see
pipeline/evaluate/probe.py) and runs a cosine k-NN (k = 20 and 200, votes exp(s/0.07)). Prints
top-1 per eval split, writes ``<run-dir>/probe.json`` and, when the run was tracked, logs the
numbers (``probe/<split>/top1`` ...) and probe.json to the run's MLflow run.
Exit status: 0 done, 2 config error or missing run files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run: config.yaml + student.pt")
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (milestones "
                   "50/70/90 scale with it; default 100)")
    p.add_argument("--train-views", type=int, default=0, help="0: probe on eval-transform "
                   "features (default); V: V fixed augmented views, epoch e uses e mod V")
    p.add_argument("--knn-k", type=int, nargs="+", default=[20, 200], help="k of the k-NN")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set data.root=/data/x")
    return p.parse_args(argv)


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def table(result: dict[str, Any], ks: list[int]) -> str:
    """One line per eval split: probe top-1 (last, best) and k-NN top-1 for each k."""
    lines = []
    for split, m in result["probe"].items():
        knn = "  ".join(f"kNN k={k} {result[f'knn_k{k}'][split]['top1']:.2f}" for k in ks)
        lines.append(f"{split}: linear probe top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} "
                     f"at epoch {int(m['best_epoch'])})  {knn}")
    return "\n".join(lines)


def log_to_mlflow(spec: Any, run_dir: Path, result: dict[str, Any], ks: list[int]) -> str | None:
    """Log the numbers and probe.json to the run's MLflow run; its id, or None if untracked."""
    info_file = run_dir / "run_info.json"
    run_id = json.loads(info_file.read_text()).get("mlflow_run_id") if info_file.is_file() else None
    if not (spec.tracking.enabled and run_id):
        return None
    from pipeline.track.mlflow_tracker import Tracker

    tracker = Tracker(spec.tracking, enabled=True, run_dir=run_dir)
    tracker.start(spec.tracking.run_name or spec.name, {}, {}, resume_run_id=run_id)
    metrics: dict[str, float] = {}
    for split, m in result["probe"].items():
        metrics.update({f"probe/{split}/{k}": v for k, v in m.items()})
        for k in ks:
            knn = result[f"knn_k{k}"][split]
            metrics.update({f"knn{k}/{split}/{n}": v for n, v in knn.items()})
    tracker.log_metrics(metrics, 0)
    tracker.set_tags({"probe_epochs": str(result["recipe"]["epochs"])})
    tracker.log_artifact(run_dir / "probe.json")
    tracker.finish("FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        for name in ("config.yaml", "student.pt"):
            if not (run_dir / name).is_file():
                raise ConfigError(f"--run-dir: expected {name} in {run_dir} (a finished run of "
                                  "launch/train.py), found none")
        spec = load_run_config(run_dir / "config.yaml", args.overrides, check_paths=False)
        import torch

        from pipeline.data import build_index
        from pipeline.evaluate.probe import ProbeRecipe, probe_student
        from pipeline.models.base import build_model
        from pipeline.models.weights import load_weights

        train_index = build_index(spec.data, spec.data.train_split)
        eval_indices = {s: build_index(spec.data, s) for s in spec.data.eval_splits}
        num_classes = spec.data.num_classes or len(train_index.classes)
        student = build_model(spec.model.arch, num_classes)
        load_weights(student, str(run_dir / "student.pt"))
        recipe = ProbeRecipe(epochs=args.epochs, seed=spec.seed)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.cpu and not spec.train.cpu
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    result = probe_student(spec, student, train_index, eval_indices, num_classes, device, recipe,
                           args.knn_k, args.train_views)
    result.update({"run_dir": str(run_dir), "student": spec.model.arch,
                   "seconds": round(time.perf_counter() - start, 1)})
    _write_json(run_dir / "probe.json", result)
    print(table(result, args.knn_k))
    if not args.no_tracking:
        run_id = log_to_mlflow(spec, run_dir, result, args.knn_k)
        if run_id:
            print(f"logged to MLflow run {run_id}")
    print(f"wrote {run_dir / 'probe.json'} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
