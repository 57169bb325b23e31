"""FitNet: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for
Thin Deep Nets" (baselines.md §1).

Hint loss, as RepDistiller codes it (``distiller_zoo/FitNet.py#L6-14`` ``HintLoss``,
``helper/loops.py#L126-129``)::

    L_hint = mean over B·C_t·H_t·W_t of (r(f_s) − f_t)²

f_s and f_t are the stage-``hint_layer`` maps of the student and the teacher (RD
``train_student.py#L88``: hint_layer = 2, the stage-2 output, for both networks; on torchvision
ResNets stage 2 is ``layer2``, the [I] choice of baselines.md §1 for ImageNet). r is
RepDistiller's ``ConvReg`` (``feature_ops.ConvReg``: a conv chosen by the spatial ratio, BN,
ReLU), trained with the student and saved with the method. With a WRN teacher the target is a
raw residual sum and can be negative while r's output is ≥ 0 (the ReLU): RepDistiller's quirk,
kept.

Terms: ``ce`` = ce_weight·CE(z_s, y) (only when ce_weight > 0) and ``fitnet`` = beta·L_hint.
Defaults: ce_weight 1, beta 100 (RD ``scripts/run_cifar_distill.sh#L7``, ``-r 1 -a 0 -b 100``).

Paper vs code. The paper trains in two stages: hints first (the student up to its guided layer
plus the regressor, on the hint loss alone), then the whole student with KD. RepDistiller and
mdistiller add the hint loss to CE for the whole run instead (one stage), and that is the
default here (``hint_epochs: 0``). ``hint_epochs: N`` gives the paper's form as an initial
phase ``hint`` of N epochs at the constant LR ``hint_lr`` that trains only the student
parameters the stage-``hint_layer`` map depends on and the regressor, on beta·L_hint; the main
phase then has no hint term (``ce`` only; compose with ``kd`` for the paper's second stage,
which anneals its KD weight, not reproduced). The default ``hint_lr`` 0.05 is the CIFAR LR, as
RepDistiller's own pre-training phase (``helper/pretrain.py``) uses the run's LR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import MAIN_PHASE, METHODS, Method, MethodContext, Phase
from pipeline.distill.feature_ops import ConvReg
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import paired_stages, student_map, teacher_map, widen
from pipeline.types import Batch, ModelOutput, TeacherOutput

HINT_PHASE = "hint"


def hint_loss(regressed: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element (RD ``HintLoss``: ``nn.MSELoss()``)."""
    return F.mse_loss(widen(regressed), widen(target))


@dataclass
class FitNetOptions:
    """Config keys of ``method: {name: fitnet, ...}``."""

    ce_weight: float = 1.0
    beta: float = 100.0
    hint_layer: int = 2  # stage index in both networks (0: the stem, -1: the last stage)
    hint_epochs: int = 0  # 0: one stage (RepDistiller); N: the paper's hint phase first
    hint_lr: float = 0.05

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if self.hint_epochs < 0:
            raise ValueError(f"hint_epochs: expected >= 0, found {self.hint_epochs}")
        if not self.hint_lr > 0:
            raise ValueError(f"hint_lr: expected a learning rate > 0, found {self.hint_lr}")


@METHODS.register("fitnet")
class FitNet(Method):
    """Regress the student's hint-stage map onto the teacher's (module docstring)."""

    Options = FitNetOptions

    @classmethod
    def requirements(cls, opts: FitNetOptions) -> Requirements:
        stage = (opts.hint_layer,)
        return Requirements(teacher_fields=(), teacher_stages=stage, student_stages=stage,
                            uses_student_logits=opts.ce_weight > 0)

    @classmethod
    def phases(cls, opts: FitNetOptions) -> tuple[Phase, ...]:
        if opts.hint_epochs == 0:
            return ()
        return (Phase(HINT_PHASE, opts.hint_epochs, opts.hint_lr),)

    def __init__(self, opts: FitNetOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        [(self.s_info, self.t_info)] = paired_stages(ctx, (opts.hint_layer,), "fitnet")
        self.regressor = ConvReg(self.s_info, self.t_info, relu=True)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        two_stage = self.opts.hint_epochs > 0
        terms: dict[str, Tensor] = {}
        if self.phase == MAIN_PHASE and self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        if self.phase == HINT_PHASE or not two_stage:
            f_s = student_map(student, self.s_info, "fitnet")
            f_t = teacher_map(teacher, self.t_info, "fitnet")
            terms["fitnet"] = self.opts.beta * hint_loss(self.regressor(f_s), f_t)
        return terms

    def phase_parameters(self, phase: Phase, student: nn.Module) -> list[nn.Parameter]:
        """The hint phase trains the regressor and the student parameters that reach the hint
        map (the paper's "up to the guided layer"), found by back-propagating from that map."""
        return [*lower_parameters(student, self.s_info.index, self.ctx.image_size),
                *self.regressor.parameters()]


def lower_parameters(student: nn.Module, stage: int, image_size: int) -> list[nn.Parameter]:
    """The parameters of ``student`` that stage map ``stage`` depends on, in ``parameters()``
    order: one eval-mode forward (BatchNorm statistics untouched) and one backward."""
    params = [p for p in student.parameters() if p.requires_grad]
    x = torch.zeros(1, 3, image_size, image_size, device=params[0].device)
    was_training = student.training
    student.eval()
    try:
        with torch.enable_grad():
            out = student(x, feats=(stage,))
            grads = torch.autograd.grad(out.feats[stage].sum(), params, allow_unused=True)
    finally:
        student.train(was_training)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]
