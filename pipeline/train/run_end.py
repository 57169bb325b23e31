"""What a run keeps besides its checkpoint: the per-epoch history, the final predictions, plots,
dataset inputs and the trained network as an MLflow model.

``<run_dir>/epochs.json`` holds one row per main-phase epoch: ``epoch``, the mean of every loss
term over the epoch's steps (``train/<term>``, ``train/loss`` their sum) and, on evaluated epochs,
the evaluation metrics (``<split>/top1`` ...). The means come from the values the trainer already
reads at its logging steps, so they cost no extra device sync; an epoch resumed from a mid-epoch
checkpoint averages the steps after the resume only. Initial phases (AB's, FT's) are not in it.

The last evaluation keeps each split's logits and the student's penultimate feature norms (and,
when the method reads the teacher's embedding, the teacher's on the first evaluation split: one
extra teacher pass over that split); the plots are drawn from those and
from ``epochs.json`` (``pipeline.evaluate.plots``), so nothing is run again for them. A run with a
cached teacher builds the teacher network from ``teacher.weights`` for the norms.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluate.loop import SplitOutputs
from pipeline.track.conventions import EVALUATION, TRAINING, dataset_input

log = logging.getLogger(__name__)
HISTORY_NAME = "epochs.json"
PLOTS_DIR = "plots"


class EpochMeans:
    """Sums of the loss values read at logging steps, turned into per-epoch means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, means: dict[str, float], steps: int) -> None:
        """``means`` over ``steps`` steps (what the trainer logs at a logging step)."""
        for k, v in means.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * steps
        self.steps += steps

    def pop(self) -> dict[str, float]:
        out = {f"train/{k}": v / self.steps for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return out


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = run_dir / HISTORY_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)
    return path


def norms_teacher(
    spec: Any, teacher: Any, teacher_fields: tuple[str, ...], num_classes: int,
    device: torch.device,
) -> Any:
    """The teacher network whose embedding norms go into the plots, or None: only for a method
    that reads the teacher's embedding (``teacher_fields``: CID, CoSS, ...)."""
    if teacher is None or "embedding" not in teacher_fields:
        return None
    if hasattr(teacher, "model"):  # online
        return teacher.model
    from pipeline.train.build import teacher_network

    net = teacher_network(spec, num_classes, load=True)[0]
    return net.to(device).eval()


def dataset_inputs(spec: Any, train_index: Any, eval_indices: dict[str, Any]) -> list[dict]:
    size = spec.data.image_size
    return [dataset_input(train_index, TRAINING, size),
            *(dataset_input(i, EVALUATION, size) for i in eval_indices.values())]


def finish_outputs(
    run_dir: Path, outputs: dict[str, SplitOutputs], class_names: list[str],
    history: list[dict[str, Any]], tracker: Any, model: dict[str, Any] | None,
) -> dict[str, float]:
    """Draw the plots, log them under ``plots/`` and (``model``: ``log_model``'s arguments) the
    network as the run's MLflow model. Main process only. Returns the seconds each took."""
    from pipeline.evaluate.plots import write_plots

    t0 = time.perf_counter()
    try:
        files = write_plots(run_dir / PLOTS_DIR, outputs, class_names, history)
    except Exception as err:  # a figure must never cost the finished run its results
        log.warning("WARNING: plots not drawn (%s: %s); the run's results are unaffected",
                    type(err).__name__, err)
        files = []
    for f in files:
        tracker.log_artifact(f, PLOTS_DIR)
    t1 = time.perf_counter()
    costs = {"plots_s": round(t1 - t0, 2)}
    if model is not None and tracker.enabled:
        tracker.log_model(**model)
        costs["log_model_s"] = round(time.perf_counter() - t1, 2)
    return costs


__all__ = ["HISTORY_NAME", "PLOTS_DIR", "EpochMeans", "dataset_inputs", "finish_outputs",
           "norms_teacher", "write_history"]
