"""gather_eval across two gloo processes with unequal row counts, padding and duplicates."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.evaluate.gather import gather_eval
from pipeline.evaluate.metrics import evaluate_all

C = 5


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank 0 holds 6 rows, rank 1 holds 5; index -1 marks padding; index 3 is on both ranks."""
    index = [torch.tensor([5, 0, 3, 7, -1, -1]), torch.tensor([1, 6, 3, 2, 4])][rank]
    g = torch.Generator().manual_seed(100 + rank)  # the duplicate of 3 differs between ranks
    logits = torch.randn(index.shape[0], C, generator=g)
    labels = torch.randint(0, C, index.shape, generator=g)
    return logits, labels, index


def expected() -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process reference: concatenate in rank order, keep the first of each index, sort."""
    rows: dict[int, tuple[torch.Tensor, int]] = {}
    for rank in range(2):
        logits, labels, index = shard(rank)
        for j, i in enumerate(index.tolist()):
            if i >= 0 and i not in rows:
                rows[i] = (logits[j], int(labels[j]))
    keys = sorted(rows)
    return torch.stack([rows[i][0] for i in keys]), torch.tensor([rows[i][1] for i in keys])


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits, labels, index = shard(rank)
        got_logits, got_labels = gather_eval(logits, labels, index)
        # A process with no rows at all passes (0, 0) logits, as the evaluation loop does.
        if rank == 1:
            logits, labels, index = torch.empty(0, 0), torch.empty(0).long(), torch.empty(0).long()
        one_logits, one_labels = gather_eval(logits, labels, index)
        torch.save(
            {
                "logits": got_logits,
                "labels": got_labels,
                "metrics": evaluate_all(got_logits, got_labels),
                "one_logits": one_logits,
                "one_labels": one_labels,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_gather_eval_two_processes(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want_logits, want_labels = expected()
    assert want_labels.shape == (8,)  # indices 0..7, each once
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["logits"], want_logits, rtol=0, atol=0)
        assert torch.equal(got["labels"], want_labels)
        assert got["metrics"] == evaluate_all(want_logits, want_labels)
        logits, labels, index = shard(0)
        order = [1, 2, 0, 3]  # rank 0 alone: indices 0, 3, 5, 7 at rows 1, 2, 0, 3
        assert index[order].tolist() == [0, 3, 5, 7]
        torch.testing.assert_close(got["one_logits"], logits[order], rtol=0, atol=0)
        assert torch.equal(got["one_labels"], labels[order])
