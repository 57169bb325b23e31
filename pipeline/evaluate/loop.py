"""Evaluation over a whole split across processes: gather logits, then compute the metrics once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from pipeline.evaluate.gather import gather_eval
from pipeline.evaluate.metrics import evaluate_all
from pipeline.types import Batch


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
    logits, labels, index = [], [], []
    for raw in loader:
        batch = prepare(raw)
        logits.append(predict(batch.images).float())
        labels.append(batch.labels)
        index.append(batch.index)
    all_logits, all_labels = gather_eval(
        torch.cat(logits) if logits else torch.empty(0, 0, device=device),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device),
        torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=device),
    )
    return evaluate_all(all_logits.cpu(), all_labels.cpu())
