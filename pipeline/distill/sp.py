"""SP: Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation"
(baselines.md §3).

Loss (the paper's §3: row-normalised batch Gram matrices and their squared Frobenius distance
over B²; RepDistiller ``distiller_zoo/SP.py#L16-30``, ``loops.py#L144-148``, which
notes it was verified by the original author; mdistiller ``distillers/SP.py`` is identical)::

    Q = vec(f) ∈ R^{B × C·H·W},   G = Q Qᵀ ∈ R^{B×B},   G̃ = G with each row L2-normalised
    L = Σ_ij (G̃_t − G̃_s)²_ij / B²

f is one stage map of each network, by default the last (``stage: -1``: RD ``feat[-2]`` on the
CIFAR nets, ``layer4`` on torchvision ResNets, baselines.md §3); the channel counts need not
match. torchdistill's ``SPKDLoss`` normalises the rows with the L1 norm (``mid_level.py#L821-823``)
and is not this loss. The loss mixes the samples of a batch: under data parallelism it is
computed on each process's own batch, as in the official multi-GPU code (baselines.md §0.4).

Terms: ``ce`` = ce_weight·CE(z_s, y) (only when ce_weight > 0) and ``sp`` = beta·L.
Defaults: ce_weight 1, beta 3000 (RD ``scripts/run_cifar_distill.sh#L11``; mdistiller
``cfg.py#L120-123``); no ImageNet weight is published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import paired_stages, student_map, teacher_map, widen
from pipeline.types import Batch, ModelOutput, TeacherOutput


def similarity(f: Tensor) -> Tensor:
    """G̃: the batch Gram matrix of the flattened maps with L2-normalised rows, (B, B)."""
    q = widen(f).flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Σ (G̃_t − G̃_s)² / B² (module docstring)."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"sp: expected maps of one batch, found batch sizes {f_s.shape[0]} and "
                         f"{f_t.shape[0]}")
    b = f_s.shape[0]
    return (similarity(f_t) - similarity(f_s)).pow(2).sum() / (b * b)


@dataclass
class SPOptions:
    """Config keys of ``method: {name: sp, ...}``."""

    ce_weight: float = 1.0
    beta: float = 3000.0
    stage: int = -1  # stage index in both networks (-1: the last stage map)

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")


@METHODS.register("sp")
class SP(Method):
    """Preserve the pairwise similarities of the batch's samples (module docstring)."""

    Options = SPOptions

    @classmethod
    def requirements(cls, opts: SPOptions) -> Requirements:
        stage = (opts.stage,)
        return Requirements(teacher_fields=(), teacher_stages=stage, student_stages=stage,
                            uses_student_logits=opts.ce_weight > 0)

    def __init__(self, opts: SPOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        [(self.s_info, self.t_info)] = paired_stages(ctx, (opts.stage,), "sp")

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        f_s = student_map(student, self.s_info, "sp")
        f_t = teacher_map(teacher, self.t_info, "sp")
        terms = {"sp": self.opts.beta * sp_loss(f_s, f_t)}
        if self.opts.ce_weight > 0:
            terms = {"ce": self.opts.ce_weight * cross_entropy(student.logits, batch.labels),
                     **terms}
        return terms
