"""AT: Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (baselines.md §2).

Spatial attention map of a stage map f (B, C, H, W) and the loss per stage k, as the authors'
code and RepDistiller compute them (``mode: code``, the default; RD ``distiller_zoo/AT.py#L15-29``,
mdistiller ``distillers/AT.py#L8-21``)::

    q(f) = normalize_L2( vec_{h,w}( mean_c f^p ) )          (per sample, F.normalize eps 1e-12)
    L_k  = mean over B·H·W of (q(f_s) − q(f_t))²
    L    = Σ_k L_k                                          (RD ``loops.py#L134-138``)

When the two maps of a stage differ in height, the larger is adaptive-average-pooled to the
smaller first (``feature_ops.match_spatial``). Channels are averaged out, so no connector is
needed.

``mode: paper`` is eq. 2 of the paper, L_k = (1/B)·Σ_b ‖q_s,b − q_t,b‖_2 with the map as a sum
over channels of |f|^p (the same map after normalisation): a per-sample L2 norm, not a squared
mean. This equals torchdistill's ``ATLoss(mode='paper')`` (``mid_level.py#L325-331``; the
discrepancy is documented there, #L287-290), which does not pool: here both modes pool. The
paper writes its weight as β/2; ``beta`` multiplies the sum directly, and its default (1000)
was set for the code form, so choose it for yourself with ``mode: paper``.

Terms: ``ce`` = ce_weight·CE(z_s, y) (only when ce_weight > 0) and ``at`` = beta·L.
Defaults: ce_weight 1, beta 1000, p 2 (RD ``scripts/run_cifar_distill.sh#L9``; mdistiller
``cfg.py#L67-71``). Stages: every stage after the stem (``stages: [all]``, RD ``feat[1:-1]``) on
CIFAR; the ImageNet R34→R18 setting of torchdistill and the AT paper is ``stages: [3, 4]``
(layer3 and layer4) with weight 1000 (TD ``rrpr2020/at-resnet18_from_resnet34.yaml#L154-174``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.feature_ops import match_spatial
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import (
    check_stage_selection,
    paired_stages,
    student_map,
    teacher_map,
    widen,
)
from pipeline.types import Batch, ModelOutput, TeacherOutput

Mode = Literal["code", "paper"]


def attention_map(f: Tensor, p: float, mode: Mode = "code") -> Tensor:
    """q(f), shape (B, H·W): channel mean of f^p (code) or sum of |f|^p (paper), L2-normalised
    per sample."""
    f = widen(f)
    pooled = f.pow(p).mean(1) if mode == "code" else f.abs().pow(p).sum(1)
    return F.normalize(pooled.flatten(1), dim=1)


def at_stage_loss(f_s: Tensor, f_t: Tensor, p: float, mode: Mode = "code") -> Tensor:
    """L_k for one pair of maps (module docstring); the larger map is pooled first."""
    f_s, f_t = match_spatial(f_s, f_t)
    diff = attention_map(f_s, p, mode) - attention_map(f_t, p, mode)
    if mode == "code":
        return diff.pow(2).mean()
    return torch.linalg.vector_norm(diff, dim=1).mean()


@dataclass
class ATOptions:
    """Config keys of ``method: {name: at, ...}``."""

    ce_weight: float = 1.0
    beta: float = 1000.0
    p: float = 2.0
    stages: list[int | str] = field(default_factory=lambda: ["all"])
    mode: Mode = "code"

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if not self.p > 0:
            raise ValueError(f"p: expected an exponent > 0, found {self.p}")
        check_stage_selection(self.stages)
        if self.mode not in ("code", "paper"):
            raise ValueError(f"mode: expected 'code' or 'paper', found {self.mode!r}")


@METHODS.register("at")
class AT(Method):
    """Match the student's spatial attention maps to the teacher's (module docstring)."""

    Options = ATOptions

    @classmethod
    def requirements(cls, opts: ATOptions) -> Requirements:
        stages = tuple(opts.stages)
        return Requirements(teacher_fields=(), teacher_stages=stages, student_stages=stages,
                            uses_student_logits=opts.ce_weight > 0)

    def __init__(self, opts: ATOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        self.pairs = paired_stages(ctx, opts.stages, "at")

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        o = self.opts
        loss = sum(
            at_stage_loss(student_map(student, s, "at"), teacher_map(teacher, t, "at"), o.p, o.mode)
            for s, t in self.pairs
        )
        terms = {"at": o.beta * loss}
        if o.ce_weight > 0:
            terms = {"ce": o.ce_weight * cross_entropy(student.logits, batch.labels), **terms}
        return terms
