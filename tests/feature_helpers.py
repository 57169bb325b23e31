"""Small builders for the feature-map method tests: stage descriptions, a MethodContext, and
random student/teacher outputs holding a map for every stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.distill.base import MethodContext
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput

Shape = tuple[int, int]  # (channels, height); maps are square


def stages(shapes: Sequence[Shape], image: int = 32) -> tuple[StageInfo, ...]:
    """A stem of 4×image² then one stage per (channels, height)."""
    all_shapes = [(4, image), *shapes]
    return tuple(StageInfo(i, "stem" if i == 0 else f"stage{i}", c, h, h, image // h, True)
                 for i, (c, h) in enumerate(all_shapes))


def context(student: Sequence[Shape], teacher: Sequence[Shape], d_s: int = 6, d_t: int = 10,
            classes: int = 5, image: int = 32) -> MethodContext:
    return MethodContext(classes, d_s, d_t, epochs=2, steps_per_epoch=3,
                         student_stages=stages(student, image),
                         teacher_stages=stages(teacher, image), image_size=image)


def outputs(ctx: MethodContext, batch: int = 2, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[ModelOutput, TeacherOutput, Batch]:
    """Random logits, embeddings and a map for every stage of both networks."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    s_feats = {s.index: rand(batch, *s.shape) for s in ctx.student_stages}
    t_feats = {s.index: rand(batch, *s.shape) for s in ctx.teacher_stages}
    student = ModelOutput(rand(batch, ctx.num_classes), rand(batch, ctx.student_dim), s_feats)
    teacher = TeacherOutput(logits=rand(batch, ctx.num_classes),
                            embedding=rand(batch, int(ctx.teacher_dim or 0)), feats=t_feats)
    labels = torch.randint(0, ctx.num_classes, (batch,), generator=g)
    return student, teacher, Batch(torch.zeros(batch, 3, 2, 2), labels, torch.arange(batch),
                                   torch.zeros_like(labels))


def td_io(tensor: object, path: str = "x") -> dict[str, dict[str, object]]:
    """torchdistill's io dict holding one output (``{path: {'output': tensor}}``)."""
    return {path: {"output": tensor}}
