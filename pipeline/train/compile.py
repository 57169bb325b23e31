"""Optional ``torch.compile`` of the student and of an online teacher (``train.compile: true``).

Modules are compiled in place (``nn.Module.compile``), so state-dict keys, checkpoints and
``student.pt`` are the same as without compilation. Compilation is lazy in PyTorch (it happens
at the first call, the backward graph at the first backward), which would hide its cost in the
first step; ``warm_up`` pays it up front instead, on one random batch of the run's shape: the
student's forward and backward in training mode (then its gradients are dropped and its
buffers — BatchNorm statistics — restored, so training is unchanged) and the teacher's forward,
under the run's autocast. Its wall time is the compilation cost the trainer logs
(``compile/seconds``). Evaluation (BatchNorm in eval mode) compiles once more at its first call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from pipeline.config.schema import RunSpec


def compile_modules(spec: RunSpec, student: nn.Module, teacher: Any) -> list[str]:
    """Compile ``student`` and the teacher's network in place when ``train.compile``; the names
    of what was compiled."""
    if not spec.train.compile:
        return []
    mode = spec.train.compile_mode
    student.compile(mode=mode)
    done = ["student"]
    model = getattr(teacher, "model", None)  # an online teacher; a cached one has nothing to run
    if isinstance(model, nn.Module):
        model.compile(mode=mode)
        done.append("teacher")
    return done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(
    student: nn.Module,
    teacher: Any,
    shape: tuple[int, int, int, int],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    student_kwargs: dict[str, Any],
    channels_last: bool = False,
) -> float:
    """Run the compiled modules once on a random ``shape`` batch (module docstring): seconds."""
    gen = torch.Generator().manual_seed(0)  # not the global stream: training draws stay equal
    x = torch.randn(shape, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = {k: v.detach().clone() for k, v in student.named_buffers()}
    was_training = student.training
    _sync(device)
    t0 = time.perf_counter()
    student.train()
    with autocast():
        out = student(x, **student_kwargs)
        terms = [out.logits, out.embedding, *(out.feats or [])]
        loss = sum(t.float().mean() for t in terms)
    loss.backward()
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        with torch.no_grad(), autocast():
            model(x, feats="feats" in getattr(teacher, "fields", ()),
                  preact=getattr(teacher, "preact", False))
    _sync(device)
    seconds = time.perf_counter() - t0
    for p in student.parameters():
        p.grad = None
    with torch.no_grad():
        for k, v in student.named_buffers():
            v.copy_(buffers[k])
    student.train(was_training)
    return seconds


def compile_run(spec: RunSpec, acc: Any, student: nn.Module, teacher: Any, method: Any,
                size: int) -> float | None:
    """Compile (``compile_modules``) and ``warm_up`` a run's networks on ``acc.device``: the
    seconds compilation took, or None without ``train.compile``."""
    if not compile_modules(spec, student, teacher):
        return None
    shape = (spec.data.batch_size, 3, size, size)
    needs = method.needs
    stages = needs.resolve_student(len(method.ctx.student_stages))
    kwargs = {"feats": stages or False, "preact": needs.student_preact}
    seconds = warm_up(student, teacher, shape, acc.device, acc.autocast, kwargs,
                      channels_last=spec.train.channels_last)
    acc.print(f"torch.compile ({spec.train.compile_mode}): {seconds:.1f} s")
    return seconds
