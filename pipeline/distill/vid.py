"""VID: Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019, "Variational Information Distillation
for Knowledge Transfer" (baselines.md §5).

The variational lower bound on the mutual information between teacher and student maps with a
Gaussian q(t | s) of mean μ(s) and per-channel variance σ² (paper §3), as RepDistiller codes it
(RD ``distiller_zoo/VID.py#L12-54``; built per stage at ``train_student.py#L219-226``, summed at
``loops.py#L166-170``). Per stage pair k:

1. pool the map of larger height to the other's size (``feature_ops.match_spatial``), before
   the regressor;
2. μ = r_k(f_s), r_k = 1×1 conv (C_s → C_t), ReLU, 1×1 conv (C_t → C_t), ReLU, 1×1 conv
   (C_t → C_t), all without bias (RD's ``conv1x1``): the middle width is the teacher's;
3. σ²_c = softplus(α_c) + ε, ε = 1e-5, α ∈ R^{C_t} initialised to log(exp(init_var − ε) − 1) so
   that σ² starts at init_var = 5 (RD computes log(1 + exp(α)); ``F.softplus`` is the same
   function, evaluated stably);
4. L_k = mean over B·C_t·H·W of ½[(μ − f_t)²/σ²_c + ln σ²_c].

L = Σ_k L_k; it can be negative. The regressors and α are trained with the student (with the
run's weight decay, as RD, whose ``trainable_list`` holds the whole ``VIDLoss``;
mdistiller leaves α out of its optimiser, so its variance stays at 5) and saved with the
method. The paper also allows per-layer weights and a heteroscedastic variance at the last layer
[R]; RD, and this file, use equal weights and per-channel σ².

Terms: ``ce`` = ce_weight·CE(z_s, y) (only when ce_weight > 0) and ``vid`` = beta·L.
Defaults: ce_weight 1, beta 1 (RD ``scripts/run_cifar_distill.sh#L15``; mdistiller
``cfg.py#L126-132``). Stages: every stage after the stem (``stages: [all]``, RD ``feat[1:-1]``;
layer1–layer4 on torchvision ResNets, baselines.md §5 [I]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput


def vid_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """mean of ½[(μ − t)²/σ² + ln σ²]; ``variance`` is (C,) per channel or broadcastable."""
    var = widen(variance).reshape(1, -1, 1, 1) if variance.dim() == 1 else widen(variance)
    return (0.5 * ((widen(mean) - widen(target)).pow(2) / var + var.log())).mean()


def vid_regressor(student: StageInfo, teacher: StageInfo) -> nn.Sequential:
    """RD's three 1×1 convs without bias, the middle width the teacher's channels."""
    c_s, c_t = student.channels, teacher.channels
    return nn.Sequential(
        nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.ReLU(),
        nn.Conv2d(c_t, c_t, kernel_size=1, bias=False), nn.ReLU(),
        nn.Conv2d(c_t, c_t, kernel_size=1, bias=False),
    )


@dataclass
class VIDOptions:
    """Config keys of ``method: {name: vid, ...}``."""

    ce_weight: float = 1.0
    beta: float = 1.0
    stages: list[int | str] = field(default_factory=lambda: ["all"])
    init_var: float = 5.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        check_stage_selection(self.stages)
        if not self.eps > 0 or not self.init_var > self.eps:
            raise ValueError(f"init_var, eps: expected init_var > eps > 0, found init_var "
                             f"{self.init_var} and eps {self.eps}")


@METHODS.register("vid")
class VID(Method):
    """Maximise a variational bound on the teacher/student mutual information per stage."""

    Options = VIDOptions

    @classmethod
    def requirements(cls, opts: VIDOptions) -> Requirements:
        stages = tuple(opts.stages)
        return Requirements(teacher_fields=(), teacher_stages=stages, student_stages=stages,
                            uses_student_logits=opts.ce_weight > 0)

    def __init__(self, opts: VIDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        self.pairs = paired_stages(ctx, opts.stages, "vid")
        self.regressors = nn.ModuleList(vid_regressor(s, t) for s, t in self.pairs)
        alpha0 = math.log(math.expm1(opts.init_var - opts.eps))
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((t.channels,), alpha0)) for _, t in self.pairs)

    def variances(self) -> list[Tensor]:
        """σ² per stage pair, (C_t,) each."""
        return [F.softplus(a) + self.opts.eps for a in self.log_scales]

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        total: Tensor | float = 0.0
        for (s, t), regressor, var in zip(self.pairs, self.regressors, self.variances(),
                                          strict=True):
            f_s, f_t = match_spatial(student_map(student, s, "vid"), teacher_map(teacher, t, "vid"))
            total = total + vid_nll(regressor(f_s), var, f_t)
        terms = {"vid": self.opts.beta * total}
        if self.opts.ce_weight > 0:
            terms = {"ce": self.opts.ce_weight * cross_entropy(student.logits, batch.labels),
                     **terms}
        return terms
