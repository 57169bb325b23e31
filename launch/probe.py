"""Evaluate a trained student's embedding by linear probe and weighted k-NN, on its own data or
transferred to another dataset.

    python launch/probe.py --run-dir runs/demo-coss
    python launch/probe.py --run-dir runs/cifar100-wrn_40_2-wrn_16_2-coss --epochs 100
    # transfer (CID Table 5): the frozen CIFAR-100 backbone probed on STL-10 / Tiny-ImageNet
    python launch/probe.py --run-dir runs/cifar100-wrn_40_2-wrn_16_2-cid \\
        --target-cfg configs/transfer/stl10.yaml

Reads ``<run-dir>/config.yaml`` and ``<run-dir>/student.pt`` (written by launch/train.py),
extracts the frozen student's pooled embedding of the training split and of every eval split
(eval transform), trains a linear classifier on the training features (the CoSS CIFAR recipe:
SGD LR 0.1, milestones 50/70/90 of 100 epochs, wd 5e-4, batch 128; see
pipeline/evaluate/probe.py) and runs a cosine k-NN (k = 20 and 200, votes exp(s/0.07)). Prints
top-1 per eval split, writes ``<run-dir>/probe.json`` and, when the run was tracked, logs the
numbers (``probe/<split>/top1`` ...) and probe.json to the run's MLflow run.

With ``--target-cfg T.yaml`` the data come from T instead (its dataset, training split with its
``train_fraction``/``drop_classes``, eval splits, image size, normalisation, class count, seed):
the network of the run is built with T's class count and loaded from ``student.pt`` without its
classifier (``pipeline/models/backbone.py``: exactly the class-count-dependent keys are left
out, every other key must match). Results go to ``<run-dir>/probe-<T's name>.json`` and to the
run's MLflow run as ``transfer/<T's name>/probe/<split>/top1`` ... The recipe flags (``--epochs``,
``--lr``, ``--batch-size``, ``--milestones``) apply in both modes.
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
from pipeline.threads import share_cpu_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run: config.yaml + student.pt")
    p.add_argument("--target-cfg", help="probe on this config's data instead (transfer): the "
                   "classifier of student.pt is dropped")
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (milestones "
                   "50/70/90 scale with it; default 100)")
    p.add_argument("--lr", type=float, default=0.1, help="linear-probe learning rate (0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="linear-probe batch (128)")
    p.add_argument("--milestones", type=int, nargs="*", default=[],
                   help="epochs where the LR drops ×0.1 (default: 50/70/90 scaled to --epochs)")
    p.add_argument("--train-views", type=int, default=0, help="0: probe on eval-transform "
                   "features (default); V: V fixed augmented views, epoch e uses e mod V")
    p.add_argument("--knn-k", type=int, nargs="+", default=[20, 200], help="k of the k-NN")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set data.root=/data/x")
    p.add_argument("--target-set", dest="target_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key of the target config")
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


def log_to_mlflow(spec: Any, run_dir: Path, result: dict[str, Any], ks: list[int],
                  out: Path, prefix: str = "") -> str | None:
    """Log the numbers and the JSON to the run's MLflow run; its id, or None if untracked.
    ``prefix`` (``transfer/<target>/``) keeps transfer results apart from the run's own data."""
    info_file = run_dir / "run_info.json"
    run_id = json.loads(info_file.read_text()).get("mlflow_run_id") if info_file.is_file() else None
    if not (spec.tracking.enabled and run_id):
        return None
    from pipeline.track.mlflow_tracker import Tracker

    tracker = Tracker(spec.tracking, enabled=True, run_dir=run_dir)
    tracker.start(spec.tracking.run_name or spec.name, {}, {}, resume_run_id=run_id)
    metrics: dict[str, float] = {}
    for split, m in result["probe"].items():
        metrics.update({f"{prefix}probe/{split}/{k}": v for k, v in m.items()})
        for k in ks:
            knn = result[f"knn_k{k}"][split]
            metrics.update({f"{prefix}knn{k}/{split}/{n}": v for n, v in knn.items()})
    tracker.log_metrics(metrics, 0)
    tags = {f"{prefix}probe_epochs": str(result["recipe"]["epochs"])}
    if prefix:
        tags[f"{prefix}dataset"] = result["target"]["dataset"]
    tracker.set_tags(tags)
    tracker.log_artifact(out)
    tracker.finish("FINISHED")
    return run_id


def _build(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The run's spec, the spec whose data are probed, the indices, and the loaded student."""
    for name in ("config.yaml", "student.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"--run-dir: expected {name} in {run_dir} (a finished run of "
                              "launch/train.py), found none")
    source = load_run_config(run_dir / "config.yaml", args.overrides, check_paths=False)
    target = (load_run_config(args.target_cfg, args.target_overrides, check_paths=False)
              if args.target_cfg else source)
    from pipeline.data import build_index, build_train_index
    from pipeline.models.backbone import load_backbone
    from pipeline.models.base import build_model
    from pipeline.models.weights import load_weights

    train_index = build_train_index(target.data)
    eval_indices = {s: build_index(target.data, s) for s in target.data.eval_splits}
    num_classes = target.data.num_classes or len(train_index.classes)
    student = build_model(source.model.arch, num_classes)
    weights = str(run_dir / "student.pt")
    if args.target_cfg:
        loaded = load_backbone(student, source.model.arch, weights)
    else:
        loaded = {**load_weights(student, weights), "dropped": []}
    return {"source": source, "target": target, "train_index": train_index,
            "eval_indices": eval_indices, "num_classes": num_classes, "student": student,
            "loaded": loaded}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        b = _build(args, run_dir)
        import torch

        from pipeline.evaluate.probe import ProbeRecipe, probe_student

        source, target = b["source"], b["target"]
        recipe = ProbeRecipe(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             milestones=list(args.milestones), seed=target.seed)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.cpu and not source.train.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        share_cpu_threads()
    start = time.perf_counter()
    result = probe_student(target, b["student"], b["train_index"], b["eval_indices"],
                           b["num_classes"], device, recipe, args.knn_k, args.train_views)
    result.update({"run_dir": str(run_dir), "student": source.model.arch,
                   "weights": b["loaded"], "seconds": round(time.perf_counter() - start, 1)})
    out, prefix = run_dir / "probe.json", ""
    if args.target_cfg:
        result["target"] = {"config": str(Path(args.target_cfg).resolve()), "name": target.name,
                            "dataset": target.data.dataset, "num_classes": b["num_classes"],
                            "fingerprint": b["train_index"].fingerprint}
        out, prefix = run_dir / f"probe-{target.name}.json", f"transfer/{target.name}/"
        print(f"transfer to {target.name} ({target.data.dataset}, {b['num_classes']} classes): "
              f"classifier {', '.join(b['loaded']['dropped']) or '(none in file)'} not loaded")
    _write_json(out, result)
    print(table(result, args.knn_k))
    if not args.no_tracking:
        run_id = log_to_mlflow(source, run_dir, result, args.knn_k, out, prefix)
        if run_id:
            print(f"logged to MLflow run {run_id}")
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
