"""AB: Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons".

A two-phase method (baselines.md §8; RepDistiller ``train_student.py#L227-238``,
``helper/pretrain.py``, ``distiller_zoo/AB.py#L11-29``):

1. **init** (``init_epochs``, 30 as RepDistiller): the AB loss alone trains the connectors and
   the student's feature modules (``feature_parameters``: every parameter but the classifier's)
   with SGD at a constant LR (``init_lr``; default the run's ``optim.lr``, as RepDistiller),
   the run's momentum and weight decay. For a connector output s and the teacher's map t, both
   pre-activation, with margin m = 1 (the paper's differentiable activation-transfer loss, as
   coded):

       ℓ(s, t) = Σ_elements (s + m)²·1[s > −m ∧ t ≤ 0] + (s − m)²·1[s ≤ m ∧ t > 0],

   and over the n selected stages L = Σ_i w_i·ℓ_i / B · 3/1000 with w_i = 2^(i−n+1) (the
   deepest stage 1, then 1/2, 1/4, ...). Only the sign of t matters. Term: ``ab``.
2. **main**: the AB term is 0 (RepDistiller ``helper/loops.py#L171-173``), so L = CE (+ KD
   when composed with ``kd``, the CID tables' form); the connectors are in eval mode and not
   optimised (they receive no gradient, so the main SGD leaves them as they are).

Connectors (RepDistiller ``models/util.py#L65-90``): the identity where a student stage has the
teacher stage's channels and height (all CIFAR pairs of the CRD zoo), else ``ConvReg`` without
ReLU (conv + BN). They are built from the stage shapes and saved in ``method.pt``.

Features: ``stages`` (default ``["all"]``, RepDistiller's ``feat[1:-1]``), **pre-activation**
(``Requirements.preact``): ResNet residual sums before the last ReLU, WRN the BN output that
follows a stage, VGG the BN outputs; the same selection resolved on each network. ImageNet:
layer1–4 pre-ReLU (baselines.md §8 [I]). Networks without pre-activation maps (timm) are
refused by the model.

Differences from RepDistiller: ``feature_parameters`` also holds modules after the last stage
(WRN's final BN, which makes WRN's last pre-activation map, and MobileNetV2's ``conv2``), which
RepDistiller's ``get_feat_modules`` leaves out and keeps in eval mode during init; here the
whole student is in train mode during init. ``β`` has no effect in RepDistiller (the main-phase
term is 0 and the init loss is unweighted), so there is no ``beta`` key.

Terms: init phase ``ab``; main phase ``ce`` = ce_weight·CE (when ce_weight > 0), nothing
otherwise (pair ``ce_weight: 0`` with ``kd``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.distill.base import MAIN_PHASE, METHODS, Method, MethodContext, Phase
from pipeline.distill.feature_ops import ConvReg
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import check_stage_selection, paired_stages
from pipeline.models.base import feature_parameters
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput

INIT_PHASE = "init"
SCALE = 3 / 1000  # RepDistiller's fixed scaling of the init loss


def ab_stage_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """ℓ(s, t) of the module docstring, summed over every element (float32 scalar).

    Args:
        student: the connector's output, (B, C, H, W); gradients flow into it.
        teacher: the teacher's pre-activation map of the same shape; only its sign is read.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"ab_stage_loss: expected maps of the same shape, found "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = student.float(), teacher.float()
        off = (s + margin).pow(2) * ((s > -margin) & (t <= 0))
        on = (s - margin).pow(2) * ((s <= margin) & (t > 0))
        return (off + on).sum()


def stage_weights(n: int) -> list[float]:
    """w_i = 2^(i−n+1) for i = 0..n−1: the deepest stage 1, each shallower one half."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def ab_loss(students: Sequence[Tensor], teachers: Sequence[Tensor], margin: float = 1.0
            ) -> Tensor:
    """L = Σ_i w_i·ℓ_i / B · 3/1000 over the stages, shallowest first (module docstring)."""
    batch = students[0].shape[0]
    weights = stage_weights(len(students))
    return sum(w * ab_stage_loss(s, t, margin)
               for w, s, t in zip(weights, students, teachers, strict=True)) / batch * SCALE


def connector(student: StageInfo, teacher: StageInfo) -> nn.Module:
    """The identity where channels and height agree, else ConvReg without ReLU."""
    if (student.channels, student.height) == (teacher.channels, teacher.height):
        return nn.Identity()
    return ConvReg(student, teacher, relu=False)


@dataclass
class ABOptions:
    """Config keys of ``method: {name: ab, ...}``."""

    ce_weight: float = 1.0
    init_epochs: int = 30
    init_lr: float | None = None  # None: the run's optim.lr (RepDistiller)
    margin: float = 1.0
    stages: tuple[int | str, ...] = ("all",)

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight")
        check_stage_selection(self.stages)
        if self.init_epochs < 1:
            raise ValueError(f"init_epochs: expected >= 1 (AB is its init phase), found "
                             f"{self.init_epochs}")
        if self.init_lr is not None and not self.init_lr > 0:
            raise ValueError(f"init_lr: expected a learning rate > 0 or null (the run's "
                             f"optim.lr), found {self.init_lr}")
        if not self.margin > 0:
            raise ValueError(f"margin: expected > 0, found {self.margin}")


@METHODS.register("ab")
class AB(Method):
    """Activation-boundary init phase, then CE (+ KD) (module docstring)."""

    Options = ABOptions

    @classmethod
    def requirements(cls, opts: ABOptions) -> Requirements:
        return Requirements(teacher_fields=(), student_stages=tuple(opts.stages),
                            teacher_stages=tuple(opts.stages), preact=True)

    @classmethod
    def phases(cls, opts: ABOptions) -> tuple[Phase, ...]:
        return (Phase(INIT_PHASE, opts.init_epochs, opts.init_lr),)

    def __init__(self, opts: ABOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        pairs = paired_stages(ctx, opts.stages, "ab")
        self.student_indices = tuple(s.index for s, _ in pairs)
        self.teacher_indices = tuple(t.index for _, t in pairs)
        self.connectors = nn.ModuleList(
            connector(ctx.student_stages[i], ctx.teacher_stages[j])
            for i, j in zip(self.student_indices, self.teacher_indices, strict=True))

    def phase_parameters(self, phase: Phase, student: nn.Module) -> list[nn.Parameter]:
        return [*self.connectors.parameters(), *feature_parameters(student)]

    def train(self, mode: bool = True) -> AB:
        super().train(mode)
        if self.phase == MAIN_PHASE:
            self.connectors.eval()  # RepDistiller loops.py#L76-77
        return self

    def set_phase(self, name: str) -> None:
        super().set_phase(name)
        self.train(self.training)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if self.phase == INIT_PHASE:
            if teacher is None or teacher.feats is None or student.feats is None:
                raise ValueError("method ab: expected the student's and teacher's "
                                 "pre-activation stage maps, found none")
            mapped = [c(student.feats[i]) for c, i in zip(self.connectors, self.student_indices,
                                                          strict=True)]
            targets = [teacher.feats[j] for j in self.teacher_indices]
            return {"ab": ab_loss(mapped, targets, self.opts.margin)}
        if self.opts.ce_weight > 0:
            return {"ce": self.opts.ce_weight * cross_entropy(student.logits, batch.labels)}
        return {}
