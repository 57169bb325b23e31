"""Small torch.distributed helpers that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes in place and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate equally shaped tensors from all processes along dim 0."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor's rows from all processes, in rank order, when the processes hold
    different numbers of rows (the same count across the ``tensors`` of one process; trailing
    dimensions equal everywhere). One collective for the lengths, one per tensor."""
    if not is_distributed():
        return tensors
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"all_gather_rows: expected tensors with the same number of rows, found "
                         f"{[tuple(t.shape) for t in tensors]}")
    lengths = all_gather_cat(torch.tensor([n], dtype=torch.long, device=tensors[0].device))
    rows = int(lengths.max())
    real = (torch.arange(rows, device=lengths.device).view(1, -1) < lengths.view(-1, 1)).flatten()
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros((rows - n, *t.shape[1:]))]) if rows > n else t
        out.append(all_gather_cat(padded)[real.to(t.device)])
    return tuple(out)
