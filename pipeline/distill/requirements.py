"""What a method needs from a run, stated once: ``Requirements``.

A method class answers ``requirements(opts)`` before anything is built (the config checks, the
cache writer and the trainer read it); its instances keep the same object as ``method.needs``.
Composite methods merge their terms' requirements with ``merge``.

Stage maps are selected with ints (stage indices of ``Net.stage_info``: 0 is the stem, negative
counts from the end) and ``"all"`` (every stage after the stem); ``resolve`` turns a selection
into indices once the networks' stage lists are known. One ``preact`` flag says whether every
stage map the method reads, the student's and the teacher's, is taken before the activation.

``teacher_modules`` names parts of the teacher's *weights* a method uses besides its outputs
(``pipeline.teacher.parts``): SRRL's frozen teacher classifier, OFD's BN statistics before each
selected stage's final ReLU. They are taken from the teacher network when the run is built, for an
online and a cached teacher alike, and reach the method as ``MethodContext.teacher_parts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from pipeline.models.features import ALL_STAGES, resolve_stages

OUTPUT_FIELDS = ("logits", "embedding")  # teacher outputs besides stage maps
TEACHER_MODULES = ("classifier", "preact_bn")  # parts of the teacher's weights (module docstring)


@dataclass(frozen=True)
class Requirements:
    """Everything a method reads, and what it does not use.

    - ``needs_teacher``: False for methods that train without one (vanilla, PS-KD);
    - ``teacher_fields``: teacher outputs besides stage maps (``logits``, ``embedding``);
    - ``teacher_stages`` / ``student_stages``: stage-map selections (module docstring);
    - ``preact``: stage maps before the activation (AB, OFD) instead of after it;
    - ``uses_student_logits``: False when no loss reaches the student's classifier (CoSS),
      so DDP must expect parameters without a gradient;
    - ``teacher_modules``: parts of the teacher's weights (``TEACHER_MODULES``): ``classifier``
      (a frozen copy of its last linear layer), ``preact_bn`` (the BN statistics before the final
      ReLU of each selected teacher stage).
    """

    needs_teacher: bool = True
    teacher_fields: tuple[str, ...] = ("logits",)
    teacher_stages: tuple[int | str, ...] = ()
    student_stages: tuple[int | str, ...] = ()
    preact: bool = False
    uses_student_logits: bool = True
    teacher_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown_modules = [m for m in self.teacher_modules if m not in TEACHER_MODULES]
        if unknown_modules:
            raise ValueError(f"requirements: teacher_modules: expected some of {TEACHER_MODULES}, "
                             f"found {unknown_modules}")
        unknown = [f for f in self.teacher_fields if f not in OUTPUT_FIELDS]
        if unknown:
            raise ValueError(
                f"requirements: teacher_fields: expected some of {OUTPUT_FIELDS} (stage maps are "
                f"teacher_stages), found {unknown}")
        for name in ("teacher_stages", "student_stages"):
            for item in getattr(self, name):
                is_index = isinstance(item, int) and not isinstance(item, bool)
                if not (item == ALL_STAGES or is_index):
                    raise ValueError(
                        f"requirements: {name}: expected stage indices or {ALL_STAGES!r}, found "
                        f"{item!r}")

    @property
    def teacher_outputs(self) -> tuple[str, ...]:
        """The ``TeacherOutput`` fields read: ``teacher_fields`` plus ``feats`` for stage maps."""
        return self.teacher_fields + (("feats",) if self.teacher_stages else ())

    @property
    def reads_stage_maps(self) -> bool:
        return bool(self.teacher_stages or self.student_stages)

    def resolve_teacher(self, num_stages: int) -> tuple[int, ...]:
        return resolve_stages(self.teacher_stages, num_stages, "teacher stage maps")

    def resolve_student(self, num_stages: int) -> tuple[int, ...]:
        return resolve_stages(self.student_stages, num_stages, "student stage maps")

    def without_teacher(self) -> Requirements:
        return replace(self, needs_teacher=False, teacher_fields=(), teacher_stages=(),
                       teacher_modules=())


def merge(parts: Iterable[tuple[str, Requirements]]) -> Requirements:
    """The union of named requirements; terms reading stage maps must agree on ``preact``."""
    parts = list(parts)
    with_maps = [(n, r) for n, r in parts if r.reads_stage_maps]
    flavours = {r.preact for _, r in with_maps}
    if len(flavours) > 1:
        raise ValueError(
            "method.terms: the terms that read stage maps disagree on preact (pre- vs "
            f"post-activation): {[n for n, _ in with_maps]}")

    def union(items: Iterable[tuple]) -> tuple:
        out: list = []
        for group in items:
            out += [x for x in group if x not in out]
        return tuple(out)

    return Requirements(
        needs_teacher=any(r.needs_teacher for _, r in parts),
        teacher_fields=tuple(
            f for f in OUTPUT_FIELDS if any(f in r.teacher_fields for _, r in parts)),
        teacher_stages=union(r.teacher_stages for _, r in parts),
        student_stages=union(r.student_stages for _, r in parts),
        preact=flavours.pop() if flavours else False,
        uses_student_logits=any(r.uses_student_logits for _, r in parts),
        teacher_modules=tuple(
            m for m in TEACHER_MODULES if any(m in r.teacher_modules for _, r in parts)),
    )
