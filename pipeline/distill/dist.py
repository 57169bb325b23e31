"""DIST: Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger
Teacher".

Relations instead of exact probabilities (paper eqs. 3-6), as the released code computes them
(hunto/image_classification_sota ``lib/models/losses/dist_kd.py``, baselines.md §16): with
Y_s = σ(z_s/τ) and Y_t = σ(z_t/τ), both (B, C),

    ρ(a, b)  = cos(a − mean(a), b − mean(b)),  cos(a, b) = a·b / (‖a‖‖b‖ + eps)   (Pearson)
    inter    = 1 − mean over the B rows of ρ(Y_s,b, Y_t,b)
    intra    = 1 − mean over the C columns of ρ(Y_s,:c, Y_t,:c)
    L        = ce_weight·CE + w_kd·τ²·(β·inter + γ·intra)

The eps sits where the official code puts it (added to the product of the norms; eps = 1e-8).
torchdistill's ``DISTLoss`` uses ``F.cosine_similarity``, which clamps the product instead, so
the two differ by a relative 1e-6-ish on ordinary batches and agree exactly at eps = 0
(``tests/test_dist.py`` states the tolerances). The intra-class term mixes the samples of a
batch: like the official multi-GPU runs, it is computed on each process's own batch
(baselines.md §0.4), so its value depends on the per-process batch size.

Released weights (baselines.md §16): β = γ = 1 inside the module, w_kd = 2 (``kd_loss_weight``)
and w_ori = 1 on both datasets, τ = 4 on CIFAR (``dist_t4``), τ = 1 on ImageNet (``dist``). So
CIFAR trains CE + 2·16·(inter + intra), ImageNet CE + 2·(inter + intra) (the "α = β = γ = 1" of
spec §5 is not what was run). Options: ``beta`` is w_kd (the method's weight, as in every method
here), ``inter_weight`` / ``intra_weight`` are the paper's β / γ.

Terms: ``ce`` (when ce_weight > 0), ``dist_inter`` (w_kd·β·τ²·inter), ``dist_intra``
(w_kd·γ·τ²·intra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

EPS = 1e-8  # the official cosine_similarity's eps


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of each row pair of ``a`` and ``b`` (B, C) → (B,), with the
    official eps placement: (a·b) / (‖a‖‖b‖ + eps) on the centred rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, tau: float,
               eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(τ²·inter, τ²·intra) of DIST (module docstring), in float32 (float64 inputs stay so)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dist: expected student and teacher logits of the same shape (B, C), "
                         f"found {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    y_s = (student_logits.to(dtype) / tau).softmax(dim=1)
    y_t = (teacher_logits.to(dtype) / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t, eps).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t(), eps).mean()
    return tau * tau * inter, tau * tau * intra


@dataclass
class DISTOptions:
    """Config keys of ``method: {name: dist, ...}`` (defaults: the released CIFAR config)."""

    tau: float = 4.0
    ce_weight: float = 1.0
    beta: float = 2.0  # w_kd, kd_loss_weight of the released configs
    inter_weight: float = 1.0  # the paper's β
    intra_weight: float = 1.0  # the paper's γ
    eps: float = EPS

    def __post_init__(self) -> None:
        check_temperature(self.tau, "tau")
        check_weights(self, "ce_weight", "beta", "inter_weight", "intra_weight")
        if not self.eps > 0:
            raise ValueError(f"eps: expected > 0 (a batch of one sample has zero-variance "
                             f"columns), found {self.eps}")


@METHODS.register("dist")
class DIST(Method):
    """Match the teacher's inter- and intra-class relations (Pearson correlations)."""

    Options = DISTOptions
    needs = Requirements(teacher_fields=("logits",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("method dist: expected teacher logits, found none")
        o = self.opts
        inter, intra = dist_parts(student.logits, teacher.logits, o.tau, o.eps)
        terms = {"dist_inter": o.beta * o.inter_weight * inter,
                 "dist_intra": o.beta * o.intra_weight * intra}
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
