"""What keeps the training step free of host waits on a GPU, in one place for the trainer.

A step on CUDA only queues work; the host runs ahead and prepares the next batch while the GPU
computes, unless something makes it wait for the queue to drain (a ``.item()``, a ``float()``
of a device tensor, a blocking host→device copy, a tensor built from Python numbers on the
device). The trainer reads loss values only on logging steps and agrees on the stop flag only
every ``train.stop_check_every_steps`` steps; this module sets up the rest:

- ``configure_backends``: ``cudnn.benchmark`` on CUDA (batch shapes are fixed: training drops
  the last partial batch, evaluation pads), unless ``train.deterministic``;
- ``place_teacher``: the online teacher in the student's memory format, its frozen weights cast
  once to the autocast dtype on CUDA (float32 on the CPU); a cached teacher wrapped so that its
  rows are read ahead of the step (``teacher.cache_prefetch``, ``pipeline.teacher.prefetch``);
- ``read_ahead``: the training batches, with the teacher's read-ahead started on them.

``tests/test_gpu.py`` checks the steady-state steps under ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pipeline.config.schema import RunSpec

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def configure_backends(spec: RunSpec, device: torch.device) -> None:
    """cuDNN autotuning for the fixed batch shapes of a run on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not spec.train.deterministic


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes convolutions in, on CUDA; None elsewhere or without AMP."""
    if device.type != "cuda":
        return None
    return _AUTOCAST_DTYPES.get(str(mixed_precision))


def place_teacher(teacher: Any, spec: RunSpec, device: torch.device, mixed_precision: str) -> Any:
    """The teacher source ready for the hot loop on ``device`` (module docstring); None stays."""
    if teacher is None:
        return None
    from pipeline.teacher.online import OnlineTeacher

    if isinstance(teacher, OnlineTeacher):
        dtype = autocast_dtype(mixed_precision, device)
        return teacher.to(device, channels_last=spec.train.channels_last, dtype=dtype)
    teacher = teacher.to(device)
    depth = spec.teacher.cache_prefetch if spec.teacher is not None else 0
    if depth > 0 and hasattr(teacher, "lookup"):
        from pipeline.teacher.prefetch import ReadAhead

        return ReadAhead(teacher, depth)
    return teacher


def read_ahead(batches: Iterable[Any], teacher: Any) -> Iterable[Any]:
    """``batches`` with the teacher's read-ahead started on them, when it has one."""
    start = getattr(teacher, "read_ahead", None)
    return start(batches) if start is not None else batches


def sync_checked(batches: Iterable[Any], first: int, stop: int) -> Iterator[Any]:
    """``batches`` unchanged; while batches ``first`` to ``stop - 1`` are being consumed, any
    host-device synchronisation raises (``torch.cuda.set_sync_debug_mode("error")``).

    For checks of the hot loop (tests, ``tools/device_check.py``): give the trainer the batches
    through this, skip the warm-up steps and stop before a logging step. The mode is global:
    threads that run meanwhile (a teacher read-ahead, a decode thread) are checked too.
    """
    if not torch.cuda.is_available():
        yield from batches
        return
    try:
        for k, batch in enumerate(batches):
            if k == first:
                torch.cuda.set_sync_debug_mode("error")
            elif k == stop:
                torch.cuda.set_sync_debug_mode("default")
            yield batch
    finally:
        torch.cuda.set_sync_debug_mode("default")
