"""Score a checkpoint on any split with every metric, as an MLflow run of its own.

    python launch/evaluate.py --run-dir runs/demo-teacher
    python launch/evaluate.py --cfg configs/demo/kd.yaml --net teacher          # the KD teacher
    python launch/evaluate.py --cfg configs/demo/teacher.yaml \\
        --weights runs/demo-teacher/student.pt --split test_unbiased --split train
    python launch/evaluate.py --cfg configs/imagenet/r34_r18_kd.yaml --net teacher \\
        --weights torchvision:IMAGENET1K_V1
    accelerate launch launch/evaluate.py --run-dir R                  # split across processes

The network is the config's ``model.arch`` (``--net student``, default) or ``teacher.arch``
(``--net teacher``), built with the dataset's class count and loaded strictly from
``--weights`` (a checkpoint file or ``torchvision:<ENUM>``; default: the run directory's
``student.pt``, or ``teacher.weights``). When the weights are a run's ``student.pt`` with a
``method.pt`` beside it, the logits come from the run's method as in training (CID's
interventional classifier); ``--head network`` scores the net's own classifier instead. The
metrics (top-1/5, NLL, ECE, AURC, ... per split, ``pipeline/evaluate/metrics.py``) are those the
trainer logs, over every sample of each split once, whatever the number of processes.

Writes ``--out`` (default ``<weights folder>/evaluations/<arch>-<weights name>.json``) and, unless
``--no-tracking`` or ``tracking.enabled: false``, an MLflow run tagged ``run_kind=evaluation``
with the metrics under their training names (``<split>/top1`` ...), linked to the training run
of the weights when ``run_info.json`` lies beside them (tag ``evaluated_run_id``), the splits as
dataset inputs (context ``evaluation``) and the plots of ``pipeline/evaluate/plots.py``
(reliability, per-class accuracy, confusion matrix, the network's feature norms), which are
also written to ``<out without .json>.plots/``.
Exit status: 0 done, 2 config error or missing files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cfg", help="YAML run config (data, network, method)")
    src.add_argument("--run-dir", help="a finished run: its config.yaml and student.pt")
    p.add_argument("--weights", help="checkpoint file or torchvision:<ENUM> (default: the run's "
                   "student.pt, or teacher.weights with --net teacher)")
    p.add_argument("--net", choices=("student", "teacher"), default="student",
                   help="score model.arch (default) or teacher.arch of the config")
    p.add_argument("--head", choices=("auto", "network", "method"), default="auto",
                   help="auto: the run's method when method.pt is beside the weights, else the "
                   "network's classifier")
    p.add_argument("--split", action="append", default=[], metavar="NAME",
                   help="split to score (repeatable; default: data.eval_splits)")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/x (repeatable)")
    return p.parse_args(argv)


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def default_out(spec: Any, arch: str, weights: str) -> Path:
    if weights.startswith("torchvision:"):
        folder, name = Path("runs") / spec.name, weights.split(":", 1)[1]
    else:
        path = Path(weights).expanduser()
        folder, name = path.parent, path.stem
    return (folder / "evaluations" / f"{arch}-{name}.json").resolve()


def table(scores: dict[str, dict[str, float]]) -> str:
    return "\n".join(
        f"{split}: top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  NLL {m['nll']:.4f}  "
        f"ECE {m['ece']:.4f}  AURC {m['aurc']:.4f}" for split, m in scores.items())


def track(spec: Any, result: dict[str, Any], out: Path, enabled: bool,
          indices: dict[str, Any] | None = None, plots: list[Path] | None = None) -> str | None:
    """The evaluation as an MLflow run of its own; its id, or None when untracked."""
    from pipeline.track.conventions import EVALUATION, dataset_input
    from pipeline.track.mlflow_tracker import Tracker

    tracker = Tracker(spec.tracking, enabled=enabled, run_dir=out.parent)
    if not tracker.enabled:
        return None
    w = result["weights"]
    tags = {"run_kind": "evaluation", "net": result["arch"], "net_role": result["net"],
            "head": result["head"], "weights": w["source"], "dataset": spec.data.dataset,
            "eval_splits": ",".join(result["splits"])}
    if w.get("sha256"):
        tags["weights_sha256"] = w["sha256"]
    if result.get("evaluated_run_id"):
        tags["evaluated_run_id"] = result["evaluated_run_id"]
    tags.update({f"dataset_fingerprint/{s}": f for s, f in result["fingerprints"].items()})
    params = {**asdict(spec), "eval": {"weights": w["source"], "net": result["net"],
                                       "head": result["head"], "splits": result["splits"]}}
    note = (f"evaluation: {result['net']} {result['arch']} ({Path(w['source']).name}, "
            f"{result['head']} head) on {spec.data.dataset} {', '.join(result['splits'])}")
    run_id = tracker.start(f"evaluate {result['arch']} {Path(w['source']).name}", params, tags,
                           description=note)
    tracker.log_inputs([dataset_input(i, EVALUATION, spec.data.image_size)
                        for i in (indices or {}).values()])
    tracker.log_model_inputs(result.get("evaluated_run_id"))
    metrics = {f"{s}/{k}": v for s, m in result["splits"].items() for k, v in m.items()}
    tracker.log_metrics(metrics, 0)
    for f in plots or []:
        tracker.log_artifact(f, "plots")
    result["mlflow_run_id"] = run_id
    write_json(out, result)
    tracker.log_artifact(out)
    tracker.finish("FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = args.cfg
        if args.run_dir:
            cfg = str(Path(args.run_dir) / "config.yaml")
            if not Path(cfg).is_file():
                raise ConfigError(f"--run-dir: expected config.yaml in {args.run_dir} (a run of "
                                  "launch/train.py), found none")
        spec = load_run_config(cfg, args.overrides, check_paths=False)
        return evaluate(spec, args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torchvision weights that cannot be fetched (offline)
        if not str(err).startswith("weights:"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def evaluate(spec: Any, args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from pipeline.data import build_index
    from pipeline.evaluate.score import build_scorer, default_weights, score_splits
    from pipeline.teacher.online import teacher_run_id
    from pipeline.threads import share_cpu_threads
    from pipeline.train.trainer import run_dir_for

    run_dir = Path(args.run_dir).resolve() if args.run_dir else run_dir_for(spec)
    weights = args.weights or default_weights(spec, args.net, run_dir)
    splits = args.split or list(spec.data.eval_splits)
    indices = {s: build_index(spec.data, s) for s in splits}
    num_classes = spec.data.num_classes or next(iter(indices.values())).num_classes
    scorer = build_scorer(spec, args.net, weights, num_classes, args.head, indices)
    cpu = args.cpu or spec.train.cpu or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=spec.train.mixed_precision)
    if acc.device.type == "cpu":
        share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    start = time.perf_counter()
    outputs: dict[str, Any] = {}
    scores = score_splits(spec, scorer, indices, acc, outputs)
    result = {
        "config": str(Path(args.run_dir or args.cfg).resolve()), "net": args.net,
        "arch": scorer.arch, "head": scorer.head, "weights": scorer.weights,
        "evaluated_run_id": teacher_run_id(weights), "num_classes": num_classes,
        "splits": scores, "num_samples": {s: len(i) for s, i in indices.items()},
        "unreadable": {s: len(i.bad) for s, i in indices.items()},
        "fingerprints": {s: i.fingerprint for s, i in indices.items()},
        "world_size": acc.num_processes, "seconds": round(time.perf_counter() - start, 2),
    }
    if acc.is_main_process:
        out = Path(args.out).resolve() if args.out else default_out(spec, scorer.arch, weights)
        write_json(out, result)
        print(table(scores))
        from pipeline.evaluate.plots import write_plots

        plots = write_plots(out.with_suffix(".plots"), outputs,
                            list(next(iter(indices.values())).classes))
        run_id = track(spec, result, out, enabled=not args.no_tracking, indices=indices,
                       plots=plots)
        if run_id:
            print(f"logged to MLflow run {run_id} (run_kind=evaluation)")
        print(f"wrote {out} ({result['seconds']} s, {acc.num_processes} process(es))")
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
