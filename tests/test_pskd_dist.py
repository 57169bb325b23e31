"""PS-KD under two gloo processes inside DistributedDataParallel: every step's predictions reach
both ranks' buffers (uneven batches, a sample on both ranks), the buffers stay identical and
equal one process's over the same samples, and the next epoch reads rows the other rank wrote."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.distill.base import MethodContext
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.distill.pskd import PSKD, PSKDOptions
from pipeline.types import Batch, ModelOutput

C, N, D = 4, 12, 3
# (rank 0 indices, rank 1 indices) per step; sample 5 is on both ranks in step 1.
EPOCH0 = [([0, 1, 2], [3, 4]), ([5, 6], [7, 8, 5])]
EPOCH1 = [([3, 4], [0, 1, 2])]  # each rank reads rows the other one wrote


def _ctx() -> MethodContext:
    return MethodContext(num_classes=C, student_dim=D, teacher_dim=None, epochs=2,
                         steps_per_epoch=2, num_train_samples=N, train_labels=torch.arange(N) % C)


class Holder(torch.nn.Module):
    """A linear 'student' and the method, as the trainer's Distiller holds them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(D, C)
        self.method = PSKD(PSKDOptions(), _ctx())

    def forward(self, x: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.method(ModelOutput(self.head(x), x), None, batch)


def _inputs(index: list[int]) -> tuple[torch.Tensor, Batch]:
    idx = torch.tensor(index)
    x = torch.stack([torch.linspace(-1, 1, D) * (i + 1) + 0.1 * i for i in index])
    return x, Batch(torch.zeros(len(idx), 3, 2, 2), idx % C, idx, torch.zeros_like(idx))


def _step(model: torch.nn.Module, index: list[int]) -> float:
    x, batch = _inputs(index)
    loss = sum(model(x, batch).values())
    loss.backward()  # grad mode on: DDP would broadcast buffers each forward
    return float(loss.detach())


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        holder = Holder()
        mark_rank_local_buffers(holder)
        model = DistributedDataParallel(holder, broadcast_buffers=True)
        holder.method.start_epoch(0)
        for step in EPOCH0:
            _step(model, step[rank])
        after0 = holder.method.predictions.clone()
        holder.method.start_epoch(1)
        losses = [_step(model, step[rank]) for step in EPOCH1]
        torch.save({"after0": after0, "losses": losses,
                    "final": holder.method.predictions.clone()}, Path(out_dir) / f"r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_both_ranks_hold_the_buffer_one_process_computes(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["after0"], ranks[1]["after0"])
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
    single = Holder()  # one process, each step's rows in rank order
    single.method.start_epoch(0)
    for r0, r1 in EPOCH0:
        _step(single, r0 + r1)
    torch.testing.assert_close(ranks[0]["after0"], single.method.predictions, rtol=1e-6, atol=1e-7)
    x, _ = _inputs([5])  # sample 5: rank 0's row (first in rank order) is the one kept
    expected = torch.softmax(single.head(x), dim=1).detach()
    torch.testing.assert_close(ranks[1]["after0"][5], expected[0], rtol=1e-6, atol=1e-7)
    untouched = [9, 10, 11]
    assert torch.equal(ranks[0]["after0"][untouched], torch.eye(C)[torch.tensor(untouched) % C])
    single.method.start_epoch(1)
    for rank in range(2):  # the epoch-1 losses each rank computed from the other's rows
        reference = Holder()
        reference.method.predictions.copy_(single.method.predictions)
        reference.method.start_epoch(1)
        loss = _step(reference, EPOCH1[0][rank])
        assert abs(ranks[rank]["losses"][0] - loss) < 1e-5
