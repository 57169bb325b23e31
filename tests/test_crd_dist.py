"""CRD across two gloo processes: each process takes its half of every global batch (rank order,
as the trainer's loader does), and after steps with DDP-averaged gradients both hold the same
banks, Z and heads as one process fed the whole global batches; one step with unequal halves
(a dropped unreadable sample) too."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.distill.base import MethodContext
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.distill.crd import CRD, CRDOptions
from pipeline.types import Batch, ModelOutput, TeacherOutput

N, C, D_S, D_T, B = 200, 4, 6, 10, 4  # B per process
LABELS = torch.arange(N) % C
CTX = MethodContext(C, D_S, D_T, epochs=1, steps_per_epoch=4, num_train_samples=N,
                    train_labels=LABELS)
OPTS = CRDOptions(ce_weight=0.0, beta=1.0, feat_dim=8, nce_k=32, seed=5)
TRAIN_STEPS, LR = 3, 0.5
# Rows of each global batch on (rank 0, rank 1); the last step has a sample missing on rank 0.
SPLITS = [(B, B)] * TRAIN_STEPS + [(B - 1, B)]


def global_step(step: int) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = torch.Generator().manual_seed(10 + step)
    n = sum(SPLITS[step])
    index = torch.randperm(N, generator=g)[:n]
    student = ModelOutput(torch.randn(n, C, generator=g), torch.randn(n, D_S, generator=g))
    teacher = TeacherOutput(embedding=torch.randn(n, D_T, generator=g))
    return student, teacher, Batch(torch.zeros(n, 1, 1, 1), LABELS[index], index,
                                   torch.zeros(n, dtype=torch.long))


def rows(step: int, lo: int, hi: int) -> tuple[ModelOutput, TeacherOutput, Batch]:
    s, t, b = global_step(step)
    return (ModelOutput(s.logits[lo:hi], s.embedding[lo:hi]),
            TeacherOutput(embedding=t.embedding[lo:hi]),
            Batch(b.images[lo:hi], b.labels[lo:hi], b.index[lo:hi], b.view[lo:hi]))


class Holder(torch.nn.Module):
    """Like the trainer's Distiller: the method is a sub-module of what DDP wraps."""

    def __init__(self, method: CRD) -> None:
        super().__init__()
        self.method = method

    def forward(self, *args: object) -> dict[str, torch.Tensor]:
        return self.method(*args)


def make() -> CRD:
    torch.manual_seed(0)
    return CRD(OPTS, CTX)


def snapshot(method: CRD, contrast: list[torch.Tensor]) -> dict:
    return {"state": {k: v.clone() for k, v in method.state_dict().items()}, "contrast": contrast}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        holder = Holder(make())
        ignored = mark_rank_local_buffers(holder)
        model = DistributedDataParallel(holder)  # broadcast_buffers=True, as the trainer
        optimizer = torch.optim.SGD(holder.parameters(), lr=LR)
        contrast = []
        for step, (n0, n1) in enumerate(SPLITS):
            lo, hi = (0, n0) if rank == 0 else (n0, n0 + n1)
            terms = model(*rows(step, lo, hi))
            contrast.append(holder.method.memory.last_contrast_idx.clone())
            if step < TRAIN_STEPS:
                optimizer.zero_grad()
                sum(terms.values()).backward()
                optimizer.step()
        holder.method.end_epoch(0)  # the replicas check passes
        out = snapshot(holder.method, contrast)
        out["ignored"] = ignored
        holder.method.memory.memory_s[0, 0] += rank  # a diverged replica is caught everywhere
        try:
            holder.method.end_epoch(0)
            out["caught"] = False
        except RuntimeError as err:
            out["caught"] = "differ between processes" in str(err)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_banks_match_one_process_over_the_same_global_batches(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = make()
    optimizer = torch.optim.SGD(single.parameters(), lr=LR)
    contrast = []
    for step in range(len(SPLITS)):
        terms = single(*global_step(step))
        contrast.append(single.memory.last_contrast_idx.clone())
        if step < TRAIN_STEPS:
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ranks[0]["state"]:  # banks, Z, step count and heads: identical on both ranks
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6,
                                   msg=f"{key} differs from one process")
    assert int(ranks[0]["state"]["memory.steps"]) == len(SPLITS)
    for step, (n0, _) in enumerate(SPLITS):  # the negatives are the single run's rows
        assert torch.equal(ranks[0]["contrast"][step], contrast[step][:n0])
        assert torch.equal(ranks[1]["contrast"][step], contrast[step][n0:])
    assert {"method.memory.memory_s", "method.memory.memory_t", "method.memory.z",
            "method.memory.steps", "method.memory.sampler.labels"} <= set(ranks[0]["ignored"])
    assert ranks[0]["caught"] and ranks[1]["caught"]
