"""Evaluation over a whole split across processes: gather logits, then compute the metrics once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.evaluate.gather import gather_eval
from pipeline.evaluate.metrics import evaluate_all
from pipeline.types import Batch

# ``predict`` returns logits, or (logits, {name: (N,) per-sample values}) for ``extras``.
Predict = Callable[[Tensor], "Tensor | tuple[Tensor, dict[str, Tensor]]"]


@dataclass
class SplitOutputs:
    """A whole split's predictions, each sample once in dataset-index order (on the CPU).

    ``values`` holds per-sample scalars computed alongside the logits (the students' and
    teachers' penultimate feature norms for the plots, ``pipeline.evaluate.plots``).
    """

    logits: Tensor
    labels: Tensor
    values: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def collect_split(
    predict: Predict,
    loader: Iterable[Batch],
    prepare: Callable[[Batch], Batch],
    device: torch.device,
    extras: tuple[str, ...] = (),
) -> SplitOutputs:
    """Run ``predict`` over ``loader`` and gather every process's rows (a collective).

    ``extras`` names the per-sample values ``predict`` returns besides the logits; every
    process passes the same names (a process without batches cannot learn them). They travel
    through the gather as extra logit columns, so they cost no collective of their own.
    """
    rows, labels, index = [], [], []
    for raw in loader:
        batch = prepare(raw)
        out = predict(batch.images)
        logits, values = (out, {}) if isinstance(out, Tensor) else out
        if set(values) != set(extras):
            raise ValueError(f"collect_split: expected per-sample values {sorted(extras)}, "
                             f"found {sorted(values)}")
        cols = [values[name].float().reshape(-1, 1) for name in extras]
        rows.append(torch.cat([logits.float(), *cols], dim=1))
        labels.append(batch.labels)
        index.append(batch.index)
    all_rows, all_labels = gather_eval(
        torch.cat(rows) if rows else torch.empty(0, 0, device=device),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device),
        torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=device),
    )
    all_rows, all_labels = all_rows.cpu(), all_labels.cpu()
    classes = all_rows.shape[1] - len(extras)
    values = {name: all_rows[:, classes + i].clone() for i, name in enumerate(extras)}
    return SplitOutputs(all_rows[:, :classes].contiguous(), all_labels, values)


@torch.no_grad()
def evaluate_split(
    predict: Callable[[Tensor], Tensor],
    loader: Iterable[Batch],
    prepare: Callable[[Batch], Batch],
    device: torch.device,
) -> dict[str, float]:
    """``predict`` maps device images to logits; ``prepare`` moves and normalises a batch.

    A process without batches still joins the gather, with empty tensors on its own device.
    """
    out = collect_split(predict, loader, prepare, device)
    return evaluate_all(out.logits, out.labels)
