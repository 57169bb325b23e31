"""HSAKD: Yang, Xu, An & Xu, IJCAI 2021, "Hierarchical Self-supervised Augmented Knowledge
Distillation" (baselines.md §18; winycg/HSAKD ``train_teacher_cifar.py#L186-221``,
``train_student_cifar.py#L193-223``).

Every training image comes with its copies rotated by k·90°, k = 0..3 (``data.rotations: 4``,
interleaved per image: ``pipeline.data.rotate``); the joint label of a row is 4·y + k. Both
networks get one auxiliary head per stage (``hsakd_heads``: a copy of the remaining stages, then
a linear layer to 4·C joint classes), reading that stage's map (the networks' ordinary maps:
post-ReLU for ResNets, the raw residual sums for WRNs, as HSAKD's models return them).

Phase 1, ``hsakd.teacher`` (a run of its own): the teacher is frozen (eval mode, no gradient:
the online teacher, or a cache of its stage maps); only its heads are trained, with
L = Σ_heads CE(head_i(f_i), 4·y + k), each a mean over the 4B rows, and saved in the run's
``method.pt``. The reference also adds the CE of the frozen main classifier on the unrotated
views, a constant without gradient, left out here. The network in the student slot is not run
(``Requirements.uses_student``); the config puts the teacher there, so evaluation reports it.

Phase 2, ``hsakd``, paper eq. 9 as the code computes it, with KL_T = T²·KL summed over classes
and averaged over rows ('batchmean'):

    L = ce_weight·CE(z_s[k = 0], y) + aux_weight·Σ_i KL_T(t_aux_i ‖ s_aux_i)
        + kd_weight·KL_T(z_t ‖ z_s)

the auxiliary and logit KLs over all 4B rows (rotated ones included); the teacher's heads are
the phase-1 ones, frozen (``method.teacher_heads``), the student's are trained with it and their
gradients reach the student's backbone. There is no joint-label CE for the student
(baselines.md §19.4). Defaults: T = 3, all weights 1. Terms: ``ce``, ``hsakd_aux``, ``kd``.

Simplification: none in the loss. The rotations are those of HSAKD (the augmented batch is
rotated). The teacher's stage maps of all four copies are needed each step: from a cache only
where they fit (``teacher.cache_stages``; CIFAR sizes in the README), else the online teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.rotate import require_rotations
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.hsakd_heads import aux_heads
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.teacher_heads import (
    DIGEST_KEY,
    FrozenHeadsMethod,
    teacher_digest,
)
from pipeline.models.features import ALL_STAGES
from pipeline.types import Batch, ModelOutput, TeacherOutput

ROTATIONS = 4


def joint_labels(labels: Tensor, rotation: Tensor) -> Tensor:
    """4·y + k of each row."""
    return labels.long() * ROTATIONS + rotation.long()


def kl_batchmean(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """T²·KL(σ(teacher/T) ‖ σ(student/T)) summed over classes, mean over rows (float32)."""
    log_p_s = F.log_softmax(student.float() / T, dim=1)
    p_t = F.softmax(teacher.float() / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


def run_heads(heads: nn.ModuleList, feats: dict[int, Tensor], stages: tuple[int, ...],
              where: str) -> list[Tensor]:
    """Each head on its stage's map (head i on ``stages[i]``)."""
    if feats is None or any(s not in feats for s in stages):
        raise ValueError(f"{where}: expected the stage maps {list(stages)}, found "
                         f"{None if feats is None else sorted(feats)}")
    return [head(feats[s]) for head, s in zip(heads, stages, strict=True)]


def _stages(count: int) -> tuple[int, ...]:
    return tuple(range(1, count))  # every stage after the stem


def _teacher_heads(ctx: MethodContext, method: str) -> tuple[nn.ModuleList, tuple[int, ...]]:
    if not ctx.teacher_arch or not ctx.teacher_stages:
        raise ValueError(f"method {method}: expected a teacher (teacher.arch), found none")
    heads = aux_heads(ctx.teacher_arch, ctx.num_classes, ROTATIONS * ctx.num_classes)
    stages = _stages(len(ctx.teacher_stages))
    if len(heads) != len(stages):
        raise ValueError(f"method {method}: {len(heads)} heads for the teacher's "
                         f"{len(stages)} stages")
    return heads, stages


@dataclass
class HSAKDOptions:
    """Config keys of ``method: {name: hsakd, ...}`` (defaults: HSAKD's code)."""

    teacher_heads: str = ""  # method.pt of the hsakd.teacher run
    T: float = 3.0
    ce_weight: float = 1.0
    aux_weight: float = 1.0
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.T)
        check_weights(self, "ce_weight", "aux_weight", "kd_weight")


def hsakd_terms(z_s: Tensor, z_t: Tensor, s_aux: list[Tensor], t_aux: list[Tensor],
                labels: Tensor, rotation: Tensor, o: HSAKDOptions) -> dict[str, Tensor]:
    """The weighted terms of phase 2 (module docstring) from the 4B-row logits, the heads'
    joint-class logits, the rows' labels and rotations."""
    if z_s.shape[0] % ROTATIONS:
        raise ValueError(f"hsakd: expected 4 interleaved rotated copies per image (4B rows), "
                         f"found {z_s.shape[0]} rows")
    # rows 0, 4, 8, ... hold rotation 0 (the interleaved layout): a strided view, no host sync
    ce = cross_entropy(z_s[::ROTATIONS], labels[::ROTATIONS])
    aux = sum(kl_batchmean(s, t.detach(), o.T) for s, t in zip(s_aux, t_aux, strict=True))
    kd = kl_batchmean(z_s, z_t.detach(), o.T)
    return {"ce": o.ce_weight * ce, "hsakd_aux": o.aux_weight * aux, "kd": o.kd_weight * kd}


@METHODS.register("hsakd")
class HSAKD(FrozenHeadsMethod):
    """HSAKD phase 2: student and its heads from the teacher and its frozen phase-1 heads."""

    Options = HSAKDOptions
    needs = Requirements(teacher_fields=("logits",), teacher_stages=(ALL_STAGES,),
                         student_stages=(ALL_STAGES,), rotations=ROTATIONS)
    frozen_heads = "teacher_heads"

    def __init__(self, opts: HSAKDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        outputs = ROTATIONS * ctx.num_classes
        self.student_heads = aux_heads(ctx.student_arch, ctx.num_classes, outputs)
        self.student_stage_ids = _stages(len(ctx.student_stages))
        heads, self.teacher_stage_ids = _teacher_heads(ctx, "hsakd")
        self.teacher_heads = self.load_frozen(heads, ctx, "teacher_heads", "hsakd")

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        require_rotations(batch, "hsakd")
        if teacher is None or teacher.logits is None:
            raise ValueError("method hsakd: expected the teacher's logits and stage maps")
        s_aux = run_heads(self.student_heads, student.feats, self.student_stage_ids,
                          "hsakd (student)")
        with torch.no_grad():
            t_aux = run_heads(self.teacher_heads, teacher.feats, self.teacher_stage_ids,
                              "hsakd (teacher)")
        return hsakd_terms(student.logits, teacher.logits, s_aux, t_aux, batch.labels,
                           batch.rotation, self.opts)


@dataclass
class HSAKDTeacherOptions:
    """Config keys of ``method: {name: hsakd.teacher}``: none (the run's optim.* set the SGD)."""


def aux_pretrain_loss(logits: list[Tensor], labels: Tensor, rotation: Tensor) -> Tensor:
    """Phase 1: Σ_heads CE(head logits, 4·y + k), each a mean over the rows."""
    target = joint_labels(labels, rotation)
    return sum(cross_entropy(z, target) for z in logits)


@METHODS.register("hsakd.teacher")
class HSAKDTeacher(Method):
    """HSAKD phase 1: the teacher's auxiliary heads on the frozen teacher. Term: ``aux_ce``."""

    Options = HSAKDTeacherOptions
    needs = Requirements(teacher_fields=(), teacher_stages=(ALL_STAGES,), rotations=ROTATIONS,
                         uses_student=False, uses_student_logits=False)

    def __init__(self, opts: HSAKDTeacherOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        self.teacher_heads, self.teacher_stage_ids = _teacher_heads(ctx, "hsakd.teacher")
        # which teacher the heads belong to (the student run checks it: teacher_heads.py)
        self.register_buffer(DIGEST_KEY, teacher_digest(ctx.teacher_arch, ctx.teacher_weights)
                             if ctx.load_teacher else torch.zeros(32, dtype=torch.uint8))
        self._correct: Tensor | None = None
        self._rows = 0

    def forward(  # type: ignore[override]
        self, student: ModelOutput | None, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        require_rotations(batch, "hsakd.teacher")
        if teacher is None:
            raise ValueError("method hsakd.teacher: expected the teacher's stage maps")
        logits = run_heads(self.teacher_heads, teacher.feats, self.teacher_stage_ids,
                           "hsakd.teacher")
        with torch.no_grad():  # the last head's joint-class top-1, read once per epoch
            hits = (logits[-1].argmax(1) == joint_labels(batch.labels, batch.rotation)).sum()
            self._correct = hits if self._correct is None else self._correct + hits
            self._rows += logits[-1].shape[0]
        return {"aux_ce": aux_pretrain_loss(logits, batch.labels, batch.rotation)}

    def epoch_metrics(self) -> dict[str, float]:
        """Joint-class top-1 of the last head over the last epoch's batches, this process."""
        if self._correct is None or not self._rows:
            return {}
        out = {"aux_top1": 100.0 * float(self._correct) / self._rows}
        self._correct, self._rows = None, 0
        return out
