"""SRRL: Yang, Martinez, Bulat & Tzimiropoulos, ICLR 2021, "Knowledge Distillation via Softmax
Regression Representation Learning".

The student's representation is trained to work with the **teacher's classifier**: a connector φ
maps the student's features into the teacher's feature space, and (paper §3, L = CE + α·L_FM +
β·L_SR)

    L_FM = MSE(pool(φ(f_s)), pool(f_t))          feature matching on channel means
    L_SR = MSE(W_t(pool(φ(f_s))), z_t)           softmax regression: the teacher's frozen
                                                  classifier W_t on the student's features

MSE is the mean over all elements (B·C_t and B·classes). Gradients reach φ and the student
through W_t, whose parameters never train (``MethodContext.teacher_parts.classifier``: a frozen
copy taken from the teacher's weights, so a cached teacher works too).

Reference code: the official ImageNet code, jingyang2017/KD_SRRL
``train_imagenet_distillation.py`` (L = CE + L_FM + weight·L_SR, weight 1) and
``distiller_zoo/AIN.py`` (``transfer_conv``: φ = 1×1 conv without bias + BN + ReLU, conv
He-normal N(0, 2/C_t), BN 1/0; ``statm_loss``: the squared difference of the spatial means,
averaged over channels and samples). Layouts (baselines.md §12):

- ``layout: map`` (default, the official one): φ on the student's last stage map (stage -1:
  layer4 of a torchvision ResNet, the last stage of the CIFAR nets), then global pooling;
- ``layout: pooled``: SimKD's CIFAR re-implementation (DefangChen/SimKD ``models/util.py``
  ``SRRL``): φ on the pooled embedding (a 1×1 conv on a 1×1 map: Linear + BN + ReLU).

pool(f_t) is read as the teacher's **embedding**, the pooled input of its classifier: for ResNets
that is exactly the pooled last stage map the official code uses, and for pre-activation WRNs
(whose last stage map is the raw residual sum, pooled only after the final BN-ReLU) it is the
vector the teacher's classifier actually sees, so both terms live in the space W_t expects. SimKD
uses the same vector. φ is He-initialised in both layouts (SimKD keeps PyTorch's default).

There is no official CIFAR code; the CID paper's SRRL rows are "+KD" (baselines.md §0.3): compose
``kd`` (CE + KD at T = 4) with ``srrl`` (``ce_weight: 0``, ``beta: 1``). The paper's α, β for
CIFAR are unpublished; the configs use the ImageNet code's 1 and 1.

Terms: ``ce`` (when ce_weight > 0), ``srrl_fm`` (beta·fm_weight·L_FM), ``srrl_sr``
(beta·sr_weight·L_SR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


def srrl_connector(c_in: int, c_out: int) -> nn.Sequential:
    """KD_SRRL's ``transfer_conv``: 1×1 conv (no bias) + BN + ReLU, conv N(0, 2/c_out), BN 1/0."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    bn = nn.BatchNorm2d(c_out)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn, nn.ReLU())


@dataclass
class SRRLOptions:
    """Config keys of ``method: {name: srrl, ...}`` (defaults: the official ImageNet code)."""

    ce_weight: float = 1.0
    beta: float = 1.0  # the method's weight (c of the CID "+KD" form)
    fm_weight: float = 1.0  # the paper's α
    sr_weight: float = 1.0  # the paper's β, the code's --weight
    layout: Literal["map", "pooled"] = "map"

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta", "fm_weight", "sr_weight")
        if self.layout not in ("map", "pooled"):
            raise ValueError(f"layout: expected 'map' (the official code) or 'pooled' (SimKD), "
                             f"found {self.layout!r}")


@METHODS.register("srrl")
class SRRL(Method):
    """Feature matching plus softmax regression through the teacher's frozen classifier."""

    Options = SRRLOptions

    @classmethod
    def requirements(cls, opts: SRRLOptions) -> Requirements:
        return Requirements(teacher_fields=("logits", "embedding"),
                            student_stages=(-1,) if opts.layout == "map" else (),
                            teacher_modules=("classifier",))

    def __init__(self, opts: SRRLOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        parts = ctx.teacher_parts
        if parts is None or parts.classifier is None:
            raise ValueError("method srrl: needs the teacher's classifier (MethodContext."
                             "teacher_parts.classifier, built from the teacher's weights), "
                             "found none")
        fc = parts.classifier
        if ctx.teacher_dim is not None and fc.in_features != ctx.teacher_dim:
            raise ValueError(f"method srrl: the teacher's classifier takes {fc.in_features} "
                             f"features, its embedding has {ctx.teacher_dim}")
        last = ctx.student_maps((-1,))[0]
        self.s_index = last.index
        c_in = last.channels if opts.layout == "map" else ctx.student_dim
        self.connector = srrl_connector(c_in, fc.in_features)
        self.teacher_classifier = fc  # frozen: requires_grad False, so never optimised

    def student_features(self, student: ModelOutput) -> Tensor:
        """pool(φ(f_s)), (B, C_t)."""
        if self.opts.layout == "map":
            if not student.feats:
                raise ValueError("method srrl: expected the student's last stage map, found none")
            f_s = student.feats[self.s_index]
        else:
            f_s = student.embedding[:, :, None, None]
        return F.adaptive_avg_pool2d(self.connector(f_s), 1).flatten(1)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None or teacher.embedding is None:
            raise ValueError("method srrl: expected the teacher's logits and embedding")
        o = self.opts
        h_s = self.student_features(student)
        fm = F.mse_loss(h_s.float(), teacher.embedding.float())
        sr = F.mse_loss(self.teacher_classifier(h_s).float(), teacher.logits.float())
        terms = {"srrl_fm": o.beta * o.fm_weight * fm, "srrl_sr": o.beta * o.sr_weight * sr}
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
