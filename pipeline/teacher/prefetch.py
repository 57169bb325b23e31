"""Cached-teacher rows read ahead of the step, in a thread.

A cache lookup reads random rows of memory-mapped arrays: page-cache hits cost microseconds per
row, misses a disk read each. Done in the training thread, the read sits between two steps and
the GPU waits for it. ``ReadAhead`` wraps a cached teacher source: ``read_ahead(batches)``
yields the loader's batches unchanged while a worker thread has already looked up the rows of
the next ``depth`` batches (numpy releases the GIL while it copies rows), as CPU tensors in
pinned memory when CUDA is present; calling the source with one of those batches then only
starts their non-blocking copies to the device. A batch that was not read ahead (another
loader, a retry) is looked up directly, so results never depend on the read-ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
from torch import Tensor

from pipeline.types import Batch, TeacherOutput

_CPU = torch.device("cpu")


def _pinned(t: Tensor) -> Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def _map(out: TeacherOutput, fn: Any) -> TeacherOutput:
    """``out`` with ``fn`` applied to every tensor it holds."""
    moved: dict[str, Any] = {}
    for f in dataclass_fields(out):
        value = getattr(out, f.name)
        if isinstance(value, Tensor):
            value = fn(value)
        elif isinstance(value, list):
            value = [fn(v) for v in value]
        elif isinstance(value, dict):
            value = {k: fn(v) for k, v in value.items()}
        moved[f.name] = value
    return TeacherOutput(**moved)


class ReadAhead:
    """A cached teacher source whose rows are read ``depth`` batches ahead (module docstring)."""

    def __init__(self, source: Any, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"teacher.cache_prefetch: expected >= 1 batches, found {depth}")
        self.source = source
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, tuple[Batch, Future[TeacherOutput]]] = {}
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:  # embedding_dim, fields, lookup ... of the source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def to(self, device: torch.device | str) -> ReadAhead:
        self.source.to(device)
        return self

    def _read(self, batch: Batch) -> TeacherOutput:
        out = self.source.lookup(batch.index, batch.view, _CPU)
        return _map(out, _pinned)

    def _submit(self, batch: Batch) -> None:
        if len(batch) == 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-read-ahead")
        self._pending[id(batch)] = (batch, self._pool.submit(self._read, batch))

    def read_ahead(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches`` unchanged, with the rows of the next ``depth`` batches being read."""
        window: deque[Batch] = deque()
        given: Batch | None = None
        try:
            for batch in batches:
                self._submit(batch)
                window.append(batch)
                if len(window) > self.depth:
                    given = window.popleft()
                    yield given
            while window:
                given = window.popleft()
                yield given
        finally:  # the consumer stopped early (end of a capped epoch, a signal, an error)
            for batch in [given, *window]:
                entry = self._pending.pop(id(batch), None) if batch is not None else None
                if entry is not None and entry[0] is batch:
                    entry[1].cancel()

    def __call__(self, batch: Batch, images: Tensor | None = None) -> TeacherOutput:
        """The source's answer for ``batch`` on ``images``' device (else ``batch.index``'s)."""
        entry = self._pending.pop(id(batch), None)
        if entry is None or entry[0] is not batch:
            self.misses += 1
            return self.source(batch, images)
        self.hits += 1
        device = images.device if images is not None else batch.index.device
        out = entry[1].result()
        if device.type == "cpu":
            return out
        return _map(out, lambda t: t.to(device, non_blocking=True))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
