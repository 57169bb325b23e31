"""IPWD across two gloo processes: weights normalised to mean 1 over both processes' samples,
equal to those of one process seeing the concatenated batch; global epoch metrics; and, with
log-ratios far above 60, the log-space normalisation with the maximum agreed across processes
(the sample with the largest log-ratio sits on the other process than most of the mass)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.distill.ipwd import IPWD, IPWDOptions, ipwd_log_weights, normalize_and_clip_log
from pipeline.types import ModelOutput, TeacherOutput
from tests.test_ipwd import confident_inputs, ctx, decimal_normalised, inputs, make_batch

SIZES = (5, 8)  # unequal per-process batches
W_MAX = {"noclip": 1e6, "clip": 2.0}
CONFIDENT_SHARDS = ([1, 6, 7], [0, 2, 3, 4, 5])  # rows of confident_inputs() per process


def shard(rank: int):
    return inputs(20 + rank, n=SIZES[rank])


def build(w_max: float) -> IPWD:
    torch.manual_seed(0)  # the same g_cls on every process and in the reference
    method = IPWD(IPWDOptions(w_max=w_max, warmup_epochs=0), ctx())
    method.train()
    method.start_epoch(0)
    return method


def run(method: IPWD, zs, zt, h, y) -> torch.Tensor:
    method(ModelOutput(zs, h), TeacherOutput(logits=zt), make_batch(y))
    with torch.no_grad():
        return method.weights(zs, method.g_cls(h), y)[0]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {}
        for name, w_max in W_MAX.items():
            method = build(w_max)
            weights = run(method, *shard(rank))
            method.end_epoch(0)
            result[name] = {"weights": weights, "metrics": method.epoch_metrics()}
        zkd, zcls, y = (t[CONFIDENT_SHARDS[rank]] for t in confident_inputs())
        log_w = ipwd_log_weights(zkd, zcls, y, "propensity", standardize=False)
        result["confident"] = normalize_and_clip_log(log_w, 1e300)[0]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def got(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of two gloo processes computed (one spawn for the module)."""
    tmp_path = tmp_path_factory.mktemp("ipwd_dist")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_confident_heads_across_processes(got: list[dict]) -> None:
    zkd, zcls, y = confident_inputs()
    want = decimal_normalised(zkd, zcls, y, 1e300)
    both = torch.empty(len(y), dtype=torch.float32)
    for rank, rows in enumerate(CONFIDENT_SHARDS):
        both[rows] = got[rank]["confident"]
    assert both.tolist() == pytest.approx(want, rel=1e-6, abs=1e-30)
    assert both[0].item() == pytest.approx(len(y), rel=1e-6)  # on process 1, beside 4 others


def test_weights_normalised_across_processes(got: list[dict]) -> None:
    parts = [shard(r) for r in range(2)]
    whole = [torch.cat([p[i] for p in parts]) for i in range(4)]
    for name, w_max in W_MAX.items():
        method = build(w_max)
        want = run(method, *whole)
        method.end_epoch(0)
        both = torch.cat([got[0][name]["weights"], got[1][name]["weights"]])
        torch.testing.assert_close(both, want, rtol=1e-6, atol=1e-7)
        if name == "noclip":
            assert abs(both.double().mean().item() - 1.0) < 1e-6
            # each process alone would not have mean 1 (the batches differ)
            assert abs(got[0][name]["weights"].double().mean().item() - 1.0) > 1e-3
        else:
            assert both.max().item() == w_max
        metrics = method.epoch_metrics()
        for r in range(2):
            assert got[r][name]["metrics"].keys() == metrics.keys()
            for key, value in metrics.items():
                assert abs(got[r][name]["metrics"][key] - value) < 1e-6, (name, key)
