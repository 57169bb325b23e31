"""Reading stage maps in feature-map methods: option checks, stage pairs, clear errors.

A method's stage selection (``stages: [all]``, ``hint_layer: 2``) is checked when the config is
loaded (``check_stage_selection``), resolved against both networks when the method is built
(``paired_stages``: one student map and one teacher map per selected stage, RepDistiller's
``zip(feat_s[1:-1], feat_t[1:-1])``), and looked up in each batch's outputs by stage index
(``student_map`` / ``teacher_map``), with an error naming the method when a map is missing.
Losses compute in at least float32 (``widen``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.distill.base import MethodContext
from pipeline.models.features import ALL_STAGES
from pipeline.types import ModelOutput, StageInfo, TeacherOutput


def widen(x: Tensor) -> Tensor:
    """``x`` in float32 (fp16/bf16 maps under autocast or from a cache), float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def check_stage_selection(selection: Sequence[object], key: str = "stages") -> None:
    """ValueError unless ``selection`` is a non-empty list of stage indices and ``"all"``."""
    if not selection:
        raise ValueError(f"{key}: expected at least one stage (an index or {ALL_STAGES!r})")
    for item in selection:
        is_index = isinstance(item, int) and not isinstance(item, bool)
        if not (is_index or item == ALL_STAGES):
            raise ValueError(f"{key}: expected stage indices (0 = the stem, -1 = the last) or "
                             f"{ALL_STAGES!r}, found {item!r}")


def require_teacher_stages(ctx: MethodContext, method: str) -> None:
    if not ctx.teacher_stages:
        raise ValueError(f"method {method}: reads the teacher's stage maps, but the run has no "
                         "teacher (set teacher.arch)")


def paired_stages(
    ctx: MethodContext, selection: Sequence[int | str], method: str
) -> list[tuple[StageInfo, StageInfo]]:
    """(student map, teacher map) per selected stage, in the order selected."""
    require_teacher_stages(ctx, method)
    student = ctx.student_maps(tuple(selection))
    teacher = ctx.teacher_maps(tuple(selection))
    if len(student) != len(teacher):
        raise ValueError(
            f"method {method}: stages {list(selection)} select {len(student)} student maps "
            f"({[s.name for s in student]}) but {len(teacher)} teacher maps "
            f"({[t.name for t in teacher]}); list stage indices that pair them")
    return list(zip(student, teacher, strict=True))


def student_map(out: ModelOutput | None, info: StageInfo, method: str) -> Tensor:
    feats = None if out is None else out.feats
    if feats is None or info.index not in feats:
        have = [] if feats is None else sorted(feats)
        raise ValueError(f"method {method}: expected the student's stage map {info.index} "
                         f"({info.name}), found stages {have}")
    return feats[info.index]


def teacher_map(teacher: TeacherOutput | None, info: StageInfo, method: str) -> Tensor:
    feats = None if teacher is None else teacher.feats
    if feats is None or info.index not in feats:
        have = [] if feats is None else sorted(feats)
        raise ValueError(f"method {method}: expected the teacher's stage map {info.index} "
                         f"({info.name}), found stages {have}")
    return feats[info.index]
