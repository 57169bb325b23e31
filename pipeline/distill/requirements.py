"""What a method needs from a run, stated once: ``Requirements``.

A method class answers ``requirements(opts)`` before anything is built (the config checks, the
cache writer and the trainer read it); its instances keep the same object as ``method.needs``.
Composite methods merge their terms' requirements with ``merge``.

Stage maps are selected with ints (stage indices of ``Net.stage_info``: 0 is the stem, negative
counts from the end) and ``"all"`` (every stage after the stem); ``resolve`` turns a selection
into indices once the networks' stage lists are known. ``student_preact`` / ``teacher_preact``
say whether each network's stage maps are taken before the activation; ``preact`` sets both
(ReviewKD's CIFAR form reads the student's maps after and the teacher's before the ReLU).

``teacher_modules`` names parts of the teacher's *weights* a method uses besides its outputs
(``pipeline.teacher.parts``): SRRL's frozen teacher classifier, OFD's BN statistics before each
selected stage's final ReLU. They are taken from the teacher network when the run is built, for an
online and a cached teacher alike, and reach the method as ``MethodContext.teacher_parts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from pipeline.data.rotate import ROTATIONS
from pipeline.models.features import ALL_STAGES, resolve_stages

OUTPUT_FIELDS = ("logits", "embedding")  # teacher outputs besides stage maps
TEACHER_MODULES = ("classifier", "preact_bn")  # parts of the teacher's weights (module docstring)


@dataclass(frozen=True)
class Requirements:
    """Everything a method reads, and what it does not use.

    - ``needs_teacher``: False for methods that train without one (vanilla, PS-KD);
    - ``teacher_fields``: teacher outputs besides stage maps (``logits``, ``embedding``);
    - ``teacher_stages`` / ``student_stages``: stage-map selections (module docstring);
    - ``preact``: both networks' stage maps before the activation (AB, OFD) instead of after
      it; ``student_preact`` / ``teacher_preact`` set one side (None: as ``preact``). After
      construction both are bools and ``preact`` is True exactly when both are;
    - ``teacher_batch_stats``: the teacher's BatchNorm layers normalise with each batch's own
      statistics (train-mode BN, running estimates untouched) instead of their running
      estimates: the official ReviewKD CIFAR code never puts its teacher in eval mode. Such
      outputs depend on the batch, so only the online teacher serves them;
    - ``uses_student_logits``: False when no loss reaches the student's classifier (CoSS),
      so DDP must expect parameters without a gradient;
    - ``teacher_modules``: parts of the teacher's weights (``TEACHER_MODULES``): ``classifier``
      (a frozen copy of its last linear layer), ``preact_bn`` (the BN statistics before the final
      ReLU of each selected teacher stage);
    - ``rotations``: 4 when every training image comes with its copies rotated by 90°, 180° and
      270° (``pipeline.data.rotate``: SSKD, HSAKD); the run's ``data.rotations`` follows it;
    - ``uses_student``: False when the student network is not run in training at all: the
      method learns from the teacher's outputs alone (the teacher phases of SSKD and HSAKD); the
      student's parameters then never change, and evaluation reports the network in the
      student slot as it was loaded.
    """

    needs_teacher: bool = True
    teacher_fields: tuple[str, ...] = ("logits",)
    teacher_stages: tuple[int | str, ...] = ()
    student_stages: tuple[int | str, ...] = ()
    preact: bool = False
    uses_student_logits: bool = True
    teacher_modules: tuple[str, ...] = ()
    student_preact: bool | None = None
    teacher_preact: bool | None = None
    teacher_batch_stats: bool = False
    rotations: int = 1
    uses_student: bool = True

    def __post_init__(self) -> None:
        if self.rotations not in ROTATIONS:
            raise ValueError(f"requirements: rotations: expected one of {ROTATIONS}, found "
                             f"{self.rotations}")
        student = self.preact if self.student_preact is None else bool(self.student_preact)
        teacher = self.preact if self.teacher_preact is None else bool(self.teacher_preact)
        object.__setattr__(self, "student_preact", student)
        object.__setattr__(self, "teacher_preact", teacher)
        object.__setattr__(self, "preact", student and teacher)
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


def _agreed_preact(parts: list[tuple[str, Requirements]], side: str) -> bool | None:
    """The ``<side>_preact`` of the terms that read ``side``'s stage maps (None: no such term);
    ValueError when they disagree."""
    readers = [(n, r) for n, r in parts if getattr(r, f"{side}_stages")]
    flavours = {getattr(r, f"{side}_preact") for _, r in readers}
    if len(flavours) > 1:
        raise ValueError(
            f"method.terms: the terms that read {side} stage maps disagree on preact (pre- vs "
            f"post-activation): {[n for n, _ in readers]}")
    return flavours.pop() if flavours else None


def merge(parts: Iterable[tuple[str, Requirements]]) -> Requirements:
    """The union of named requirements. The terms that read one network's stage maps must agree
    on that network's preact; a side no term reads follows the other (else post-activation).
    One term asking for ``teacher_batch_stats`` makes the one teacher forward of a step use them
    for every term (as in the official ReviewKD code, whose optional KL reads the same pass)."""
    parts = list(parts)
    student = _agreed_preact(parts, "student")
    teacher = _agreed_preact(parts, "teacher")
    student = teacher if student is None else student
    teacher = student if teacher is None else teacher

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
        uses_student_logits=any(r.uses_student_logits for _, r in parts),
        teacher_modules=tuple(
            m for m in TEACHER_MODULES if any(m in r.teacher_modules for _, r in parts)),
        student_preact=bool(student),
        teacher_preact=bool(teacher),
        teacher_batch_stats=any(r.teacher_batch_stats for _, r in parts),
        rotations=max((r.rotations for _, r in parts), default=1),
        uses_student=any(r.uses_student for _, r in parts),
    )
