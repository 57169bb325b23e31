"""CID class centres across two gloo processes: each feeds half of the same samples, and after
``end_epoch`` both hold the centres one process computes from all of them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.distill.base import MethodContext
from pipeline.distill.cid import CIDIntervention, InterventionOptions
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.types import Batch, ModelOutput, TeacherOutput

C, D = 6, 5
CTX = MethodContext(C, D, 7, epochs=3, steps_per_epoch=4)
# Class 5 never appears: its centre stays at zero everywhere.
LABELS = [[0, 1, 1, 2], [3, 0, 4, 4], [2, 2, 0, 1], [4, 3, 3, 0]]


def step_inputs(step: int) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = torch.Generator().manual_seed(50 + step)
    y = torch.tensor(LABELS[step])
    n = len(y)
    student = ModelOutput(torch.randn(n, C, generator=g), torch.randn(n, D, generator=g))
    teacher = TeacherOutput(logits=torch.randn(n, C, generator=g) * 3)
    return student, teacher, Batch(torch.zeros(n, 3, 2, 2), y, torch.arange(n), torch.zeros_like(y))


class Holder(torch.nn.Module):
    """Like the trainer's Distiller: the method is a sub-module of what DDP wraps."""

    def __init__(self, method: CIDIntervention) -> None:
        super().__init__()
        self.method = method

    def forward(self, *args: object) -> dict[str, torch.Tensor]:
        return self.method(*args)


def make() -> CIDIntervention:
    torch.manual_seed(0)
    return CIDIntervention(InterventionOptions(warmup_epochs=1), CTX)


def run_epoch(method: CIDIntervention, steps: list[int]) -> None:
    method.start_epoch(0)  # the last warm-up epoch: centres accumulate
    for step in steps:
        method(*step_inputs(step))
    method.end_epoch(0)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        method = make()
        run_epoch(method, [rank, rank + 2])  # rank 0: steps 0, 2; rank 1: steps 1, 3
        method.start_epoch(1)
        ctx_used = method.ctx_used.clone()
        # A mid-epoch checkpoint: sync_for_checkpoint moves the partial sums into rank 0.
        method(*step_inputs(rank))
        method.sync_for_checkpoint()
        # Inside a module that DDP wraps (the trainer's Distiller), the accumulators keep this
        # process's own sums once marked rank-local; unmarked, DDP's broadcast of rank 0's
        # buffers overwrites them and end_epoch raises on every process.
        errors = []
        for mark in (True, False):
            holder = Holder(make())
            if mark:
                mark_rank_local_buffers(holder)
            wrapped = DistributedDataParallel(holder, broadcast_buffers=True)
            holder.method.start_epoch(0)
            for step in (rank, rank + 2):  # grad mode on: DDP syncs buffers only then
                wrapped(*step_inputs(step))
            if mark:
                own_acc_weight = holder.method.acc_weight.clone()
            try:
                holder.method.end_epoch(0)
            except RuntimeError as err:
                errors.append((mark, "overwritten" in str(err)))
        torch.save(
            {
                "ctx_used": ctx_used,
                "ready": bool(method.centres_ready),
                "acc_sum": method.acc_sum.clone(),
                "acc_weight": method.acc_weight.clone(),
                "ddp_acc_weight": own_acc_weight,
                "errors": errors,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_centres_match_one_process_with_all_samples(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = make()
    run_epoch(single, [0, 1, 2, 3])
    single.start_epoch(1)
    both = make()
    both.start_epoch(1)
    for step in (0, 1):
        both(*step_inputs(step))
    assert single.centres_ready and torch.equal(single.ctx_used[5], torch.zeros(D))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["ready"]
        torch.testing.assert_close(got["ctx_used"], single.ctx_used, rtol=1e-6, atol=1e-6)
        if rank == 0:
            torch.testing.assert_close(got["acc_sum"], both.acc_sum, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["acc_weight"], both.acc_weight, rtol=1e-6, atol=1e-6)
        else:
            assert got["acc_weight"].abs().sum() == 0 and got["acc_sum"].abs().sum() == 0
        own = make()
        own.start_epoch(0)
        for step in (rank, rank + 2):
            own(*step_inputs(step))
        torch.testing.assert_close(got["ddp_acc_weight"], own.acc_weight, rtol=1e-6, atol=1e-6)
        assert got["errors"] == [(False, True)]
