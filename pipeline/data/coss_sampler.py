"""CoSS nearest-neighbour batches (Singh & Wang, ECCV 2024; specs/methods.md §4.3).

The official ``batch_sampler.py::CFBatchSampler`` [C ``paganpasta/coss-pytorch``] builds every
batch from a few *anchors*, each followed by ``nearest_k`` of its nearest neighbours in the
teacher's embedding space (supplement, Algorithm 1: ``x = [x, Omega^k]``):

- each epoch the anchors (all training samples) are shuffled with a seed of (seed, epoch) and
  split between the processes, so every anchor is used once per epoch across processes;
- for each anchor, ``nearest_k`` neighbours are drawn **without replacement, uniformly** from
  its top ``total_k`` (15 of 31 in the ImageNet script); when ``total_k == nearest_k`` the first
  ``nearest_k`` are taken;
- a process's batch is ``anchors_per_batch × (1 + nearest_k)`` images (16 × 16 = 256 per GPU
  in the official run), anchor first, then its neighbours; the loss is per process.

``CoSSOrder`` is that sampler as an ORDER function: the same signature and role as
``pipeline.data.loader.train_order`` (the sample indices of every batch of one process for one
epoch, int64 (steps, batch_size)), so every loader backend that batches by an order function
gets CoSS batches. ``order_function(spec)`` picks the order a ``DataSpec`` asks for
(``data.sampler``). Here ``data.batch_size`` counts images, as everywhere: anchors per batch =
batch_size / (1 + coss_k). Choices:

- The anchor permutation and its split are exactly ``train_order``'s (same random stream, same
  drop-last rule): ``N // (P·a)`` equal steps on every process, the last ``N mod (P·a)`` anchors
  of the permutation skipped that epoch. With ``coss_k = 0`` the order IS ``train_order``.
- The neighbour draws come from a second stream of (seed, epoch), consumed in permutation
  order, so the neighbours of an anchor do not depend on the number of processes. The official
  code draws them with the global ``np.random`` state, unseeded per epoch.
- A neighbour may also be an anchor, or the neighbour of another anchor, of the same batch; the
  official sampler allows both too.
- Every image of an epoch uses that epoch's augmentation view (``view_for_epoch``), like any
  other batch; the teacher and the student see the same view (spec §4.4).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.loader import _ORDER_TAG, _check_process, train_order
from pipeline.data.neighbours import load_neighbours

OrderFn = Callable[[int, int, int, int, int, int], np.ndarray]
_NEIGHBOUR_TAG = 0xC055  # the neighbour-draw stream, apart from the anchor permutation
_DRAW_ROWS = 1 << 16  # anchors per block of random keys (bounds the memory of a draw)


class CoSSOrder:
    """The CoSS batch order; call it like ``train_order`` (module docstring).

    ``neighbours``: int (N, ≥ m) lists, most similar first (``pipeline.data.neighbours``);
    may be None when ``k == 0``.
    """

    def __init__(self, neighbours: np.ndarray | None, k: int, m: int) -> None:
        if not 0 <= k <= m:
            raise ConfigError(f"data.coss_k: expected 0 <= coss_k <= coss_m = {m}, found {k}")
        if k > 0:
            if neighbours is None:
                raise ConfigError("data.neighbours: required when data.coss_k > 0, found none")
            if neighbours.ndim != 2 or neighbours.shape[1] < m:
                raise ConfigError(
                    f"data.neighbours: expected (N, >= coss_m = {m}) lists, found "
                    f"{neighbours.shape}"
                )
        self.neighbours, self.k, self.m = neighbours, k, m

    def __call__(
        self, n: int, batch_size: int, seed: int, epoch: int, process_index: int,
        num_processes: int,
    ) -> np.ndarray:
        """Sample indices of every batch of this process: int64 (steps, batch_size)."""
        _check_process(process_index, num_processes, batch_size)
        k, per_anchor = self.k, 1 + self.k
        if k == 0:
            return train_order(n, batch_size, seed, epoch, process_index, num_processes)
        if batch_size % per_anchor:
            raise ConfigError(
                f"data.batch_size: expected a multiple of 1 + data.coss_k = {per_anchor}, found "
                f"{batch_size}"
            )
        assert self.neighbours is not None
        if self.neighbours.shape[0] != n:
            raise ConfigError(
                f"data.neighbours: lists for {self.neighbours.shape[0]} samples, found a training "
                f"split of {n}"
            )
        a = batch_size // per_anchor
        # The anchors: train_order's permutation and split, with a anchors per process and step.
        anchors = train_order(n, a, seed, epoch, process_index, num_processes)  # (steps, a)
        steps = anchors.shape[0]
        per_step = num_processes * a
        # Positions of this process's anchors in the (resized) permutation, for the draw stream.
        pos = (np.arange(steps)[:, None] * per_step + process_index * a + np.arange(a)).ravel()
        rng = np.random.default_rng(
            np.random.SeedSequence([seed % (1 << 64), epoch, _ORDER_TAG, _NEIGHBOUR_TAG])
        )
        drawn = np.empty((len(pos), k), dtype=np.int64)
        flat = anchors.ravel()
        total = steps * per_step
        # Uniform k of m without replacement: the first k of a sort of m uniform keys.
        for start in range(0, total, _DRAW_ROWS):
            stop = min(start + _DRAW_ROWS, total)
            mine = (pos >= start) & (pos < stop)
            # Drawn whether or not they are ours, so the stream does not depend on the split.
            block = rng.random((stop - start, self.m), dtype=np.float32) if k < self.m else None
            if not mine.any():
                continue
            rows = np.asarray(self.neighbours[flat[mine], : self.m], dtype=np.int64)
            if block is None:
                drawn[mine] = rows[:, :k]
            else:
                pick = np.argsort(block[pos[mine] - start], axis=1, kind="stable")[:, :k]
                drawn[mine] = np.take_along_axis(rows, pick, axis=1)
        if drawn.size and (drawn.min() < 0 or drawn.max() >= n):
            raise ConfigError(
                f"data.neighbours: expected sample indices in 0..{n - 1}, found "
                f"{drawn.min()}..{drawn.max()}"
            )
        batches = np.concatenate([flat[:, None], drawn], axis=1)  # anchor, then its k
        return batches.reshape(steps, batch_size)


@functools.lru_cache(maxsize=2)
def _cached_lists(path: str, mtime_ns: int, size: int, m: int, n: int | None) -> np.ndarray:
    del mtime_ns, size  # part of the cache key only: a rewritten file is read again
    return np.ascontiguousarray(load_neighbours(path, n, m)[:, :m])


def read_lists(path: str | os.PathLike[str], m: int, n: int | None = None) -> np.ndarray:
    """The first ``m`` columns of a neighbour file, in memory, read once per file version."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        load_neighbours(p, n, m)  # raises the explanatory ConfigError
    st = p.stat()
    return _cached_lists(str(p), st.st_mtime_ns, st.st_size, m, n)


def order_function(spec: DataSpec, n: int | None = None) -> OrderFn:
    """The training order ``spec`` asks for: ``train_order`` or a ``CoSSOrder`` (``n``: the
    training split's size, checked against the neighbour file)."""
    if spec.sampler == "default":
        return train_order
    if spec.sampler != "coss":
        raise ConfigError(f"data.sampler: expected 'default' or 'coss', found {spec.sampler!r}")
    if spec.coss_k == 0:
        return CoSSOrder(None, 0, spec.coss_m)
    if not spec.neighbours:
        raise ConfigError("data.neighbours: required when data.sampler is 'coss' and coss_k > 0")
    return CoSSOrder(read_lists(spec.neighbours, spec.coss_m, n), spec.coss_k, spec.coss_m)


def dry_run_sampler(spec: DataSpec, out_dir: str | os.PathLike[str]) -> None:
    """Fit a CoSS sampler to a dry run's few synthetic samples (``launch/train.py --dry-run``).

    The dry run keeps the sampler, with random neighbour lists (self excluded) written to
    ``out_dir``: k = 1 drawn from the top min(m, 2), batch_size 2 (one anchor + its neighbour).
    """
    if spec.sampler != "coss" or spec.coss_k == 0:
        return
    n = spec.synthetic_size
    m = max(1, min(spec.coss_m, 2, n - 1))
    rng = np.random.default_rng(0)
    lists = np.stack([rng.permutation(np.delete(np.arange(n), i))[:m] for i in range(n)])
    path = Path(out_dir) / "dry_run_neighbours.npy"
    np.save(path, lists.astype(np.int32))
    spec.coss_k, spec.coss_m, spec.neighbours = 1, m, str(path)
    spec.batch_size = 2
