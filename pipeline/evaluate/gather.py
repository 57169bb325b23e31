"""Gather evaluation outputs from every process into one copy of the whole evaluation set.

A distributed evaluation loader gives each process a different number of rows, pads batches with
rows whose ``index`` is -1, and may hand the same sample to two processes (a sampler that evens
out shard lengths repeats samples). Metrics such as ECE and AURC do not decompose over shards, so
they are computed on the gathered set: every sample exactly once, in dataset-index order, which
makes the result independent of the number of processes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.dist import all_gather_cat


def _pad_rows(t: Tensor, rows: int, value: float) -> Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_full((rows - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad], dim=0)


def dedup_by_index(logits: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drop padding rows (index -1), keep the first row of each index, sort by index."""
    keep = index >= 0
    logits, labels, index = logits[keep], labels[keep], index[keep]
    # A stable sort keeps equal indices in input order, so the first of each run is the first seen.
    index, order = torch.sort(index, stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    order = order[first]
    return logits[order], labels[order], index[first]


def gather_eval(logits: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """All processes' evaluation rows, each sample once, sorted by dataset index.

    Every process calls this (it is a collective) with its own rows: ``logits`` (n, C),
    ``labels`` (n,), ``index`` (n,) where n may differ between processes and may be 0 (then
    logits may be (0, 0)); C must agree between processes that have rows. The
    per-process lengths are gathered first, each process pads to the longest, the padded tensors
    are gathered with ``pipeline.dist.all_gather_cat`` and trimmed back to the true lengths.
    Rows with index -1 (padding) are then dropped, duplicates of an index keep the first row in
    rank order, and the rows are sorted by index. Every process receives the same result, on the
    device of its inputs (CUDA with NCCL, CPU with gloo). In a single process only the dropping,
    deduplication and sorting happen.

    Returns:
        ``(logits, labels)`` of the whole evaluation set.
    """
    n = logits.shape[0]
    if labels.shape != (n,) or index.shape != (n,):
        raise ValueError(
            f"gather_eval: expected logits (n, C), labels (n,) and index (n,), found "
            f"{tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(index.shape)}"
        )
    if logits.dim() != 2:
        raise ValueError(f"gather_eval: expected logits (n, C), found {tuple(logits.shape)}")
    device = logits.device
    labels = labels.to(device=device, dtype=torch.long)
    index = index.to(device=device, dtype=torch.long)
    shapes = all_gather_cat(torch.tensor([[n, logits.shape[1]]], dtype=torch.long, device=device))
    lengths, widths = shapes[:, 0], shapes[:, 1]
    rows = int(lengths.max())
    # A process without rows may pass (0, 0) logits; give them the class count of the others.
    classes = {int(c) for c, m in zip(widths, lengths, strict=True) if m > 0}
    if len(classes) > 1:  # every process sees the same shapes, so all raise together
        raise ValueError(
            f"gather_eval: expected the same number of classes on every process, found "
            f"{widths.tolist()} (rows {lengths.tolist()})"
        )
    if classes and n == 0:
        logits = logits.new_zeros((0, classes.pop()))
    g_logits = all_gather_cat(_pad_rows(logits, rows, 0.0))
    g_labels = all_gather_cat(_pad_rows(labels, rows, 0))
    g_index = all_gather_cat(_pad_rows(index, rows, -1))
    # Trim: row j of process r's block is real when j < lengths[r].
    real = (torch.arange(rows, device=device).view(1, -1) < lengths.view(-1, 1)).flatten()
    g_logits, g_labels, _ = dedup_by_index(g_logits[real], g_labels[real], g_index[real])
    return g_logits, g_labels


__all__ = ["dedup_by_index", "gather_eval"]
