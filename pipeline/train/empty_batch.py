"""A training batch with no readable image, on one process of several: a zero-loss step.

The loaders drop unreadable files from training batches, so a batch can be empty. Alone, a
process just skips that step. Under DDP it cannot: every process must run the same collectives
in the same order, or the others wait forever: DDP's gradient all-reduce in backward, the
method's own (IPWD's weight normalisation, CID's centre sums), the stop-flag agreement. So the
process runs the step as usual on its empty batch (forward of zero images through the student,
the teacher and the method, backward, optimiser step) with the loss

    0 · Σ_terms nan_to_num(term)

Terms averaged over zero samples are NaN; ``nan_to_num``'s gradient is 0 there, so every
parameter the forward touched gets an exact zero gradient and DDP's all-reduce receives the same
buckets as on the other processes. The all-reduced gradient is the mean over processes, with
this process contributing 0, and the optimiser step is the same on every process, so the replicas
stay identical. (Running the forward on a dummy image instead would feed it into IPWD's global
weight sums and CID's class centres; zero images change nothing.) Batch norm in training mode on
zero images leaves its running statistics as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero_loss(losses: dict[str, Tensor]) -> Tensor:
    """0 · Σ nan_to_num(term): a loss whose gradient is exactly zero for every parameter."""
    total = sum(torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for v in losses.values())
    return total * 0.0  # type: ignore[return-value]


def report_empty_step(process_index: int, epoch: int, step: int) -> None:
    print(f"warning: process {process_index}: epoch {epoch + 1} step {step}: no readable image "
          "in this batch (see the bad-sample report); zero-loss step, the other processes' "
          "batches still train", flush=True)
