"""NST: Huang & Wang, 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer".

Each channel of a stage map is a sample of "neuron selectivity" over the H·W positions; the
student's channels should be distributed like the teacher's, measured by the squared MMD with
the polynomial kernel k(x, y) = (xᵀy)² (d = 2, c = 0, the paper's choice). Per selected stage
(baselines.md §10, RepDistiller ``distiller_zoo/NST.py#L16-42``):

1. pool the map of larger height to the other's size (adaptive average pooling);
2. F = f.view(B, C, H·W) with each channel L2-normalised over H·W;
3. L_k = mean_{B·C_t²} k(t_i, t_j) + mean_{B·C_s²} k(s_i, s_j) − 2·mean_{B·C_s·C_t} k(s_i, t_j),
   the first term without gradient (a constant);

L = β·Σ_k L_k with β = 50 (RepDistiller ``scripts/run_cifar_distill.sh#L27``; the paper writes
λ/2·MMD²). RepDistiller forms k by broadcasting to (B, C_t, C_s, H·W), which does not fit in
memory on ImageNet maps (R34 layer1: 64·64·3136 floats per sample); here each mean is
mean((F_a F_bᵀ)²) with a batched matmul, the same number (tested against the broadcast form).
Channel counts need not match (no connector).

Features: ``stages`` (default ``["all"]``: every stage after the stem, RepDistiller's
``feat[1:-1]``, mdistiller's ``feats[1:]``), post-activation, the same selection resolved on
each network; both must then have the same number of stages (ResNet-50 → VGG-8 and
ResNet-50 → MobileNetV2 have 4 each, the CIFAR ResNets and WRNs 3). ImageNet: no published
setting; ``["all"]`` is layer1–4 post-ReLU (baselines.md §10, [I]).

Terms: ``ce`` = ce_weight·CE (when ce_weight > 0) and ``nst`` = β·Σ_k L_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.feature_ops import match_spatial
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import check_stage_selection, paired_stages
from pipeline.types import Batch, ModelOutput, TeacherOutput


def _selectivities(f: Tensor) -> Tensor:
    """(B, C, H·W) with each channel L2-normalised over positions."""
    return F.normalize(f.reshape(f.shape[0], f.shape[1], -1), dim=2)


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over (B, C_a, C_b) of (a_i · b_j)²."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_k of one stage (module docstring).

    Args:
        student: (B, C_s, H_s, W_s) student map; gradients flow into it.
        teacher: (B, C_t, H_t, W_t) teacher map (no gradient).
    Returns:
        A float32 scalar.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = match_spatial(student.float(), teacher.detach().float())
        s, t = _selectivities(s), _selectivities(t)
        with torch.no_grad():
            tt = _poly_kernel_mean(t, t)
        return tt + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


@dataclass
class NSTOptions:
    """Config keys of ``method: {name: nst, ...}``."""

    ce_weight: float = 1.0
    beta: float = 50.0
    stages: tuple[int | str, ...] = ("all",)

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        check_stage_selection(self.stages)


@METHODS.register("nst")
class NST(Method):
    """MMD² between the student's and teacher's channel selectivities (module docstring)."""

    Options = NSTOptions

    @classmethod
    def requirements(cls, opts: NSTOptions) -> Requirements:
        return Requirements(teacher_fields=(), student_stages=tuple(opts.stages),
                            teacher_stages=tuple(opts.stages))

    def __init__(self, opts: NSTOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        pairs = paired_stages(ctx, opts.stages, "nst")
        self.student_indices = tuple(s.index for s, _ in pairs)
        self.teacher_indices = tuple(t.index for _, t in pairs)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.feats is None or student.feats is None:
            raise ValueError("method nst: expected the student's and teacher's stage maps, "
                             "found none")
        terms: dict[str, Tensor] = {}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        loss = sum(nst_loss(student.feats[i], teacher.feats[j])
                   for i, j in zip(self.student_indices, self.teacher_indices, strict=True))
        terms["nst"] = self.opts.beta * loss
        return terms
