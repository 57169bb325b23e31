"""OFD: Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019, "A Comprehensive Overhaul of Feature
Distillation".

Distils the teacher's **pre-ReLU** stage maps (``preact: true``) through a connector, with a
**margin** and a **partial L2** (paper §3, eqs. 2-4), as the authors' code computes it
(clovaai/overhaul-distillation ``ImageNet/distiller.py`` and ``CIFAR-100/distiller.py``, which are
identical; ``train_with_distillation.py``):

- margin, per channel c of the BN before the teacher stage's final ReLU (γ, β its affine
  parameters, taken as the std and mean of the pre-ReLU response; ``get_margin_from_BN``):
  m_c = E[x | x < 0] for x ~ N(β, γ²) = β − |γ|·φ(β/|γ|) / Φ(−β/|γ|) when Φ(−β/|γ|) > 0.001,
  and −3|γ| otherwise (φ, Φ: standard normal density and distribution);
- partial L2 (``distillation_loss``): with t' = max(t, m), Σ (s − t')² over the elements where
  s > t' or t' > 0: a student response below a negative teacher response costs nothing;
- connector per stage (``build_feature_connector``): 1×1 conv (C_s → C_t, no bias) + BN, conv
  N(0, 2/C_t), BN 1/0, trained with the student;
- position: the pre-ReLU output of every stage (not the stem): layer1-4 of a torchvision ResNet,
  the three stages of the CIFAR ResNets and WRNs (for WRNs the BN-applied maps of
  ``get_bn_before_relu``), each paired with the same stage of the student; stage i of n is
  weighted 1/2^(n−i) (the deepest 1);
- L = CE + Σ_i L_i / 2^(n−i) / B / 1000 on CIFAR-100, / 10000 on ImageNet: ``beta`` is that
  1/1000 or 1/10000 (default 1e-3; the ImageNet config sets 1e-4).

The margin comes from the teacher's BN statistics, taken from its weights when the run is built
(``Requirements.teacher_modules: preact_bn``, ``Net.preact_bn``), so the method also runs from a
teacher cache that stores the pre-ReLU maps of the selected stages.

Where this differs from the authors' code: their teacher runs in train mode (BatchNorm on batch
statistics, its running statistics drifting); ours is the frozen eval-mode teacher every method
here uses (an online or cached one), whose maps use the running statistics. Their student and
teacher maps always have equal spatial sizes; where they do not, the larger is average-pooled to
the smaller (``feature_ops.match_spatial``) before the margin is applied. γ = 0 (a dead channel)
gives margin min(β, 0), the limit of the formula, where the code divides by zero.

Terms: ``ce`` (when ce_weight > 0) and ``ofd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.feature_ops import match_spatial
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.models.features import ALL_STAGES
from pipeline.types import Batch, ModelOutput, TeacherOutput


def margin_from_bn(weight: Tensor, bias: Tensor) -> Tensor:
    """Per-channel margin E[x | x < 0], x ~ N(bias, weight²) (module docstring), float32."""
    s, m = weight.double().abs(), bias.double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    cdf = torch.special.ndtr(-m / safe)
    density = torch.exp(-((m / safe) ** 2) / 2) / math.sqrt(2 * math.pi)
    truncated = m - safe * density / cdf.clamp_min(1e-300)
    margin = torch.where(cdf > 0.001, truncated, -3 * s)
    return torch.where(s > 0, margin, m.clamp_max(0)).float()


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Σ (s − t')² where s > t' or t' > 0, t' = max(t, margin) (``distillation_loss``)."""
    target = torch.maximum(target, margin)
    keep = (source > target) | (target > 0)
    return ((source - target) ** 2 * keep).sum()


def ofd_connector(c_in: int, c_out: int) -> nn.Sequential:
    """1×1 conv (no bias) + BN, conv N(0, 2/c_out), BN 1/0 (``build_feature_connector``)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    bn = nn.BatchNorm2d(c_out)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@dataclass
class OFDOptions:
    """Config keys of ``method: {name: ofd, ...}`` (defaults: the authors' CIFAR-100 code)."""

    ce_weight: float = 1.0
    beta: float = 1e-3  # 1/1000 CIFAR-100, 1/10000 ImageNet
    stages: list[int | str] = field(default_factory=lambda: [ALL_STAGES])

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if not self.stages or 0 in self.stages:
            raise ValueError(f"stages: expected stage indices after the stem or 'all', found "
                             f"{self.stages}")


@METHODS.register("ofd")
class OFD(Method):
    """Pre-ReLU feature distillation with a BN-derived margin and a partial L2."""

    Options = OFDOptions

    @classmethod
    def requirements(cls, opts: OFDOptions) -> Requirements:
        stages = tuple(opts.stages)
        return Requirements(teacher_fields=(), teacher_stages=stages, student_stages=stages,
                            preact=True, teacher_modules=("preact_bn",))

    def __init__(self, opts: OFDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        s_maps, t_maps = ctx.student_maps(tuple(opts.stages)), ctx.teacher_maps(tuple(opts.stages))
        if len(s_maps) != len(t_maps):
            raise ValueError(f"method ofd: stages {opts.stages} give {len(s_maps)} student and "
                             f"{len(t_maps)} teacher maps; pair them by listing indices")
        parts = ctx.teacher_parts
        missing = [t.index for t in t_maps if parts is None or t.index not in parts.preact_bn]
        if missing:
            raise ValueError(f"method ofd: needs the teacher's BN statistics before the ReLU of "
                             f"stages {missing} (MethodContext.teacher_parts.preact_bn), found "
                             "none")
        self.pairs = [(s.index, t.index) for s, t in zip(s_maps, t_maps, strict=True)]
        self.connectors = nn.ModuleList(ofd_connector(s.channels, t.channels)
                                        for s, t in zip(s_maps, t_maps, strict=True))
        for i, t in enumerate(t_maps):
            bn = parts.preact_bn[t.index]
            # derived from the teacher's weights at every start: not saved
            self.register_buffer(f"margin{i}", margin_from_bn(bn.weight, bn.bias).view(1, -1, 1, 1),
                                 persistent=False)

    def distill_loss(self, student: ModelOutput, teacher: TeacherOutput) -> Tensor:
        """Σ_i partial_l2(connector_i(f_s), f_t, margin_i) / 2^(n−1−i), summed over the batch."""
        n, total = len(self.pairs), None
        for i, ((s_index, t_index), connector) in enumerate(zip(self.pairs, self.connectors,
                                                                strict=True)):
            f_s, f_t = match_spatial(connector(student.feats[s_index]).float(),
                                     teacher.feats[t_index].float())
            loss = partial_l2(f_s, f_t, getattr(self, f"margin{i}")) / 2 ** (n - 1 - i)
            total = loss if total is None else total + loss
        return total

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or not teacher.feats or not student.feats:
            raise ValueError("method ofd: expected the pre-ReLU stage maps of student and teacher")
        o = self.opts
        terms = {"ofd": o.beta * self.distill_loss(student, teacher) / len(batch)}
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
