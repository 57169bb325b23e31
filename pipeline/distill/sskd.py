"""SSKD: Xu, Liu, Li & Loy, ECCV 2020, "Knowledge Distillation Meets Self-Supervision"
(baselines.md §17; xuguodong03/SSKD ``student.py#L123-298``, ``wrapper.py``; torchdistill 1.1.5
``AuxSSKDLoss`` and ``SSKDLoss``, against which ``tests/test_sskd.py`` checks both phases).

Every training image comes with its copies rotated by 90°, 180°, 270° (``data.rotations: 4``,
interleaved per image: ``pipeline.data.rotate``); rows with rotation 0 are the "normal" views
(B of them), the others the 3B "augmented" ones. Both networks get an SS head on the pooled
penultimate vector h: Linear(d, d) → ReLU → Linear(d, d). For the SS head outputs u, S is the
(3B, B) matrix of cosine similarities cos(u_aug_r, u_normal_b); row r belongs to image r // 3.

Phase 1, ``sskd.teacher`` (a run of its own): the teacher is frozen (eval mode, no gradient);
its SS head is trained with L = CE(S_t, r // 3), mean over the 3B rows (``AuxSSKDLoss``), and
saved in the run's ``method.pt``. The network in the student slot is not run
(``Requirements.uses_student``): the config puts the teacher there, so evaluation reports it.

Phase 2, ``sskd`` (paper eq. 4-8 as the authors' code weighs them, baselines.md §17):

    L = ce_weight·CE(z_s[normal], y) + kd_weight·T²·KL(σ(z_t/T) ‖ σ(z_s/T))[normal]
        + tf_weight·tf_T²·KL(σ(z_t/tf_T) ‖ σ(z_s/tf_T))[kept augmented rows]
        + ss_weight·ss_T²·KL(σ(S_t/ss_T) ‖ σ(S_s/ss_T))[kept rows of S]

each KL summed over classes (columns of S) and averaged over its rows. Kept rows: those the
teacher gets right (the ground-truth class, or the row's own image in S_t, ranked first) plus
⌊ratio·#wrong⌋ of the wrong ones with the best ground-truth rank (``ratio_tf`` 1.0 keeps all,
``ratio_ss`` 0.75). The teacher's SS head is the phase-1 one, frozen, from
``method.teacher_heads``; the student's is trained with the student (weight decay like every
parameter). Defaults: CE 0.1, KD 0.9, tf 2.7, ss 10, T = tf_T = 4, ss_T = 0.5 (SSKD CIFAR;
torchdistill's ImageNet config uses CE 1.0). Terms: ``ce``, ``kd``, ``sskd_tf``, ``sskd_ss``.

Simplifications (and why):
- the four rotated copies share one random crop and flip (the plan's draw for (sample, view);
  the SSKD code draws a crop per copy), so a teacher cache can replay them
  (``pipeline.data.rotate``);
- the kept rows are selected with a mask and a count on the device instead of indexing by the
  host-side count, so a step never waits for the GPU; the selected rows are the reference's
  (same ranking, same ``argsort``), and each KL is the same sum over them.

Several processes: S is built from each process's own batch (the images of its rows), as the
official and torchdistill runs compute it per GPU (baselines.md §0.4).

Teacher cache: both phases read the teacher's embeddings (and phase 2 its logits) of the four
rotated copies, which a cache of a 4-rotation plan stores per (index, view, rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.rotate import require_rotations
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_interval, check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.teacher_heads import (
    DIGEST_KEY,
    FrozenHeadsMethod,
    teacher_digest,
)
from pipeline.types import Batch, ModelOutput, TeacherOutput

ROTATIONS = 4


def ss_head(dim: int) -> nn.Sequential:
    """SSKD's SS head (``wrapper.py``): Linear(d, d) → ReLU → Linear(d, d)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def split_views(x: Tensor) -> tuple[Tensor, Tensor]:
    """(normal rows (B, ...), augmented rows (3B, ...)) of an interleaved 4-rotation tensor."""
    if x.shape[0] % ROTATIONS:
        raise ValueError(f"sskd: expected 4 interleaved rotated copies per image (4B rows), "
                         f"found {x.shape[0]} rows")
    grouped = x.reshape(-1, ROTATIONS, *x.shape[1:])
    return grouped[:, 0], grouped[:, 1:].reshape(-1, *x.shape[1:])


def similarity_matrix(u: Tensor) -> Tensor:
    """S (3B, B): cos(u_aug_r, u_normal_b) of SS-head outputs ``u`` (4B, d), float32."""
    normal, aug = split_views(u.float())
    return F.cosine_similarity(aug.unsqueeze(2), normal.t().unsqueeze(0), dim=1)


def own_image(num_images: int, device: torch.device) -> Tensor:
    """The column of S each augmented row belongs to: r // 3."""
    return torch.arange(num_images, device=device).repeat_interleave(ROTATIONS - 1)


def target_rank(scores: Tensor, target: Tensor) -> Tensor:
    """Rank of ``target`` in each row of ``scores`` sorted descending (0: ranked first), as the
    SSKD code computes it (argsort, then the position of the target)."""
    order = torch.argsort(scores, dim=1, descending=True)
    return torch.argmax(torch.eq(order, target.unsqueeze(1)).long(), dim=1)


def kept_rows(rank: Tensor, ratio: float) -> Tensor:
    """Mask of the rows SSKD keeps: every correct row (rank 0) and ⌊ratio·#wrong⌋ wrong rows,
    those first in ``argsort(rank)`` (the smallest ranks). Computed on the device, no sync."""
    n = rank.shape[0]
    wrong = (rank > 0).sum()
    keep = (n - wrong) + torch.floor(wrong.double() * ratio).long()
    position = torch.empty_like(rank)
    position[torch.argsort(rank)] = torch.arange(n, device=rank.device)
    return position < keep


def masked_kl(student: Tensor, teacher: Tensor, mask: Tensor, T: float) -> Tensor:
    """T²·Σ_rows∈mask KL(σ(teacher/T) ‖ σ(student/T)) / #mask (torch's 'batchmean' on the kept
    rows; 0 when none is kept)."""
    log_p_s = F.log_softmax(student.float() / T, dim=1)
    p_t = F.softmax(teacher.float() / T, dim=1)
    rows = F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1)
    kept = mask.to(rows.dtype)
    return (rows * kept).sum() / kept.sum().clamp_min(1.0) * (T * T)


def ss_pretrain_loss(teacher_ss: Tensor) -> Tensor:
    """Phase 1: CE(S_t, r // 3), the mean over the 3B augmented rows (``AuxSSKDLoss``)."""
    s = similarity_matrix(teacher_ss)
    return F.cross_entropy(s, own_image(s.shape[1], s.device))


@dataclass
class SSKDOptions:
    """Config keys of ``method: {name: sskd, ...}`` (defaults: SSKD's CIFAR code)."""

    teacher_heads: str = ""  # method.pt of the sskd.teacher run
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    tf_weight: float = 2.7
    ss_weight: float = 10.0
    T: float = 4.0
    tf_T: float = 4.0
    ss_T: float = 0.5
    ratio_tf: float = 1.0
    ratio_ss: float = 0.75

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "kd_weight", "tf_weight", "ss_weight")
        for key in ("T", "tf_T", "ss_T"):
            check_temperature(getattr(self, key), key)
        check_interval(self, "ratio_tf", 0.0, 1.0, closed_high=True)
        check_interval(self, "ratio_ss", 0.0, 1.0, closed_high=True)


def sskd_terms(z_s: Tensor, z_t: Tensor, u_s: Tensor, u_t: Tensor, labels: Tensor,
               o: SSKDOptions) -> dict[str, Tensor]:
    """The four weighted terms of phase 2 (module docstring) from interleaved 4B-row logits
    ``z_s``, ``z_t``, SS-head outputs ``u_s``, ``u_t`` and the B labels of the images."""
    zs_normal, zs_aug = split_views(z_s)
    zt_normal, zt_aug = split_views(z_t.detach())
    ce = cross_entropy(zs_normal, labels)
    kd = masked_kl(zs_normal, zt_normal, torch.ones_like(labels, dtype=torch.bool), o.T)
    aug_labels = labels.repeat_interleave(ROTATIONS - 1)
    tf_mask = kept_rows(target_rank(F.softmax(zt_aug.float() / o.tf_T, dim=1), aug_labels),
                        o.ratio_tf)
    tf = masked_kl(zs_aug, zt_aug, tf_mask, o.tf_T)
    s_s, s_t = similarity_matrix(u_s), similarity_matrix(u_t).detach()
    ss_mask = kept_rows(target_rank(s_t, own_image(s_t.shape[1], s_t.device)), o.ratio_ss)
    ss = masked_kl(s_s, s_t, ss_mask, o.ss_T)
    return {"ce": o.ce_weight * ce, "kd": o.kd_weight * kd, "sskd_tf": o.tf_weight * tf,
            "sskd_ss": o.ss_weight * ss}


@METHODS.register("sskd")
class SSKD(FrozenHeadsMethod):
    """SSKD phase 2: the student with its SS head, from the teacher and its phase-1 SS head."""

    Options = SSKDOptions
    needs = Requirements(teacher_fields=("logits", "embedding"), rotations=ROTATIONS)
    frozen_heads = "teacher_head"

    def __init__(self, opts: SSKDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method sskd: expected the teacher's embedding size, found none")
        self.student_head = ss_head(ctx.student_dim)
        self.teacher_head = self.load_frozen(ss_head(int(ctx.teacher_dim)), ctx,
                                             "teacher_head", "sskd")

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        require_rotations(batch, "sskd")
        if teacher is None or teacher.logits is None or teacher.embedding is None:
            raise ValueError("method sskd: expected the teacher's logits and embedding")
        u_s = self.student_head(student.embedding.float())
        with torch.no_grad():
            u_t = self.teacher_head(teacher.embedding.float())
        labels = split_views(batch.labels)[0]
        return sskd_terms(student.logits, teacher.logits, u_s, u_t, labels, self.opts)


@dataclass
class SSKDTeacherOptions:
    """Config keys of ``method: {name: sskd.teacher}``: none (the run's optim.* set the SGD)."""


@METHODS.register("sskd.teacher")
class SSKDTeacher(Method):
    """SSKD phase 1: the teacher's SS head on the frozen teacher. Term: ``ss_ce``."""

    Options = SSKDTeacherOptions
    needs = Requirements(teacher_fields=("embedding",), rotations=ROTATIONS, uses_student=False,
                         uses_student_logits=False)

    def __init__(self, opts: SSKDTeacherOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method sskd.teacher: expected the teacher's embedding size")
        self.teacher_head = ss_head(int(ctx.teacher_dim))
        # which teacher the heads belong to (the student run checks it: teacher_heads.py)
        self.register_buffer(DIGEST_KEY, teacher_digest(ctx.teacher_arch, ctx.teacher_weights)
                             if ctx.load_teacher else torch.zeros(32, dtype=torch.uint8))
        self._correct: Tensor | None = None
        self._rows: Tensor | None = None

    def forward(  # type: ignore[override]
        self, student: ModelOutput | None, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        require_rotations(batch, "sskd.teacher")
        if teacher is None or teacher.embedding is None:
            raise ValueError("method sskd.teacher: expected the teacher's embedding")
        u = self.teacher_head(teacher.embedding.float())
        with torch.no_grad():  # diagnostics, summed on the device, read once per epoch
            s = similarity_matrix(u)
            hits = (s.argmax(1) == own_image(s.shape[1], s.device)).sum()
            self._correct = hits if self._correct is None else self._correct + hits
            self._rows = (s.shape[0] if self._rows is None else self._rows + s.shape[0])
        return {"ss_ce": ss_pretrain_loss(u)}

    def epoch_metrics(self) -> dict[str, float]:
        """Top-1 of the SS task (each rotated copy picks its own image) over the last epoch's
        training batches, on this process."""
        if self._correct is None or not self._rows:
            return {}
        out = {"ss_top1": 100.0 * float(self._correct) / float(self._rows)}
        self._correct, self._rows = None, None
        return out
