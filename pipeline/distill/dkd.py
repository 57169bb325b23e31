"""DKD: Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge Distillation".

The KD loss splits into a target-class part and a non-target part (paper eq. 7:
KD = TCKD + (1 − p_t,gt)·NCKD), which DKD re-weights independently (eq. 8):

    L = ce_weight·CE(z_s, y) + w(e)·(α·TCKD + β·NCKD)

at temperature T, with p = σ(z/T):
- TCKD = T²/B · Σ_b KL(b_t ‖ b_s), b = [p_gt, 1 − p_gt] the binary target/non-target split;
- NCKD = T²/B · Σ_b KL(q_t ‖ q_s), q = σ(z/T − 1000·onehot(y)), the softmax over the non-target
  classes (the target logit is pushed down after the division by T), which equals the explicitly
  renormalised p_c / Σ_{c'≠y} p_c' (baselines.md §14, checked in ``tests/test_dkd.py``);
- the warm-up w(e) = min(e / W, 1) with e counted from 1, as mdistiller's trainer
  (``engine/trainer.py``): the first epoch trains with 1/W, constant within an epoch; W = 0
  means no warm-up.

Reference code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` (``dkd_loss``). One
difference, in rounding only: mdistiller takes ``log`` of the summed softmax probabilities b_s,
which is −inf (and the loss inf) once every non-target probability underflows in float32 (a
logit gap above about 100·T); here log b_s comes from log-sum-exps of the logits, equal wherever
mdistiller's is finite.

Defaults: mdistiller's CIFAR configuration (``engine/cfg.py``: CE 1, α 1, β 8, T 4, warm-up 20);
β is set per pair in the configs (8 for resnet32x4 → resnet8x4, 6 for WRN-40-2 → WRN-16-2, 2 for
resnet56 → resnet20); ImageNet: β 0.5, T 1, warm-up 1. Terms: ``ce``, ``dkd_tckd`` (w·α·TCKD),
``dkd_nckd`` (w·β·NCKD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

MASK = 1000.0  # mdistiller's push-down of the target logit (after dividing by T)


def _binary_log_probs(logits: Tensor, gt: Tensor) -> Tensor:
    """(B, 2) log [p_gt, 1 − p_gt] of σ(logits), from log-sum-exps (no log of 0)."""
    total = torch.logsumexp(logits, dim=1)
    log_gt = logits.gather(1, gt.unsqueeze(1)).squeeze(1) - total
    others = torch.logsumexp(logits.masked_fill(F.one_hot(gt, logits.shape[1]).bool(),
                                                float("-inf")), dim=1) - total
    return torch.stack([log_gt, others], dim=1)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
              T: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of DKD eq. 8, each × T² and averaged over the batch (module docstring).

    Args:
        student_logits: z_s (B, C); teacher_logits: z_t (B, C); labels: y (B,); T > 0.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dkd: expected student and teacher logits of the same shape (B, C), "
                         f"found {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    z_s, z_t, y = student_logits.float() / T, teacher_logits.float() / T, labels.long()
    batch = z_s.shape[0]
    log_b_s, log_b_t = _binary_log_probs(z_s, y), _binary_log_probs(z_t, y)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="sum", log_target=True)
    mask = F.one_hot(y, z_s.shape[1]).to(z_s.dtype) * MASK
    log_q_s = F.log_softmax(z_s - mask, dim=1)
    q_t = F.softmax(z_t - mask, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum")
    scale = T * T / batch
    return tckd * scale, nckd * scale


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(e / W, 1) with e = epoch + 1 (``epoch`` 0-based); 1 without a warm-up (W = 0)."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


@dataclass
class DKDOptions:
    """Config keys of ``method: {name: dkd, ...}`` (defaults: mdistiller's CIFAR ones)."""

    T: float = 4.0
    alpha: float = 1.0  # TCKD weight
    beta: float = 8.0  # NCKD weight; per pair in the configs
    ce_weight: float = 1.0
    warmup_epochs: int = 20  # W; 0: none

    def __post_init__(self) -> None:
        check_temperature(self.T)
        check_weights(self, "alpha", "beta", "ce_weight")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: expected >= 0 (0: no warm-up), found "
                             f"{self.warmup_epochs}")


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD: target and non-target parts of KD, weighted apart, with a warm-up."""

    Options = DKDOptions
    needs = Requirements(teacher_fields=("logits",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("method dkd: expected teacher logits, found none")
        o = self.opts
        tckd, nckd = dkd_parts(student.logits, teacher.logits, batch.labels, o.T)
        w = warmup_factor(self.epoch, o.warmup_epochs)
        terms = {"dkd_tckd": w * o.alpha * tckd, "dkd_nckd": w * o.beta * nckd}
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
