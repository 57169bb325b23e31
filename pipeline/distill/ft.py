"""FT: Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network: Network Compression via
Factor Transfer".

A two-phase method (baselines.md §9; RepDistiller ``train_student.py#L239-253``,
``helper/pretrain.py``, ``models/util.py#L7-62``, ``distiller_zoo/FT.py#L17-31``):

1. **paraphraser** (``paraphraser_epochs``, 30 as RepDistiller): the paraphraser P, an
   encoder of three 3×3 convs (C_t → C_t → ⌊k·C_t⌋ → ⌊k·C_t⌋, k = 0.5) and a decoder of three
   3×3 transposed convs back to C_t, each followed by LeakyReLU(0.1), bias, no BN, learns to
   reconstruct the teacher's map f_t: L = MSE(P.decoder(P.encoder(f_t)), f_t) (mean over the
   elements). The student is not run (``Phase.uses_student`` False), so this phase also runs
   from a teacher cache. SGD at ``paraphraser_lr`` (default the run's ``optim.lr``;
   RepDistiller uses 0.01 when the student is a CIFAR ResNet or WRN, which the CIFAR configs
   state), the run's momentum and weight decay. Term: ``reconstruction``.
2. **main**: the translator T (the same three-conv encoder on the student's map, C_s → C_s →
   ⌊k·C_t⌋ → ⌊k·C_t⌋, with BN) is trained with the student; P is frozen (no gradient, eval
   mode). With factors F_s = T(f_s) and F_t = P.encoder(f_t), pooled to the smaller height:

   - ``mode: code`` (default, RepDistiller): φ(F) = L2-normalise(vec_hw(mean_c F²)), a
     channel-collapsed attention-like map, and L = mean_{B·H·W} |φ(F_s) − φ(F_t)|;
   - ``mode: paper`` (the paper's FT loss with p = 1, torchdistill's ``FTLoss``):
     L = mean_{B·C·H·W} |F_s/‖F_s‖₂ − F_t/‖F_t‖₂| with F the whole vectorised factor.

   L_main = ce_weight·CE + β·L with β = 200 (RepDistiller ``run_cifar_distill.sh#L23``;
   torchdistill's ImageNet run uses the paper form with 1000 and a translator without BN,
   ``translator_bn: false``). Terms: ``ce`` (when ce_weight > 0) and ``ft``.

Features: ``stage`` (default -1, the last stage map, RepDistiller's ``feat[-2]``) of both
networks, post-activation (ResNet post-ReLU; WRN the raw residual sum). ImageNet: ``layer4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import MAIN_PHASE, METHODS, Method, MethodContext, Phase
from pipeline.distill.feature_ops import match_spatial
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

PARAPHRASER_PHASE = "paraphraser"
FTMode = Literal["code", "paper"]


def _encoder(c_in: int, c_factor: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_in), (c_in, c_factor), (c_factor, c_factor)):
        layers += [nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b) if bn else nn.Identity(),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser`` (``use_bn=False``): encoder to the factor, decoder back."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _encoder(channels, factor_channels, bn=False)
        layers: list[nn.Module] = []
        for a, b in ((factor_channels, factor_channels), (factor_channels, channels),
                     (channels, channels)):
            layers += [nn.ConvTranspose2d(a, b, 3, 1, 1), nn.LeakyReLU(0.1)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


def _factor_attention(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(dim=1).reshape(f.shape[0], -1), dim=1)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, mode: FTMode = "code") -> Tensor:
    """L of the main phase (module docstring), float32.

    Args:
        student_factor: T(f_s), (B, C, H_s, W_s); gradients flow into it.
        teacher_factor: P.encoder(f_t), (B, C, H_t, W_t); no gradient.
        mode: ``code`` (RepDistiller) or ``paper`` (the paper, torchdistill's ``FTLoss``).
    """
    with torch.autocast(device_type=student_factor.device.type, enabled=False):
        s, t = match_spatial(student_factor.float(), teacher_factor.float())
        if mode == "code":
            return (_factor_attention(s) - _factor_attention(t)).abs().mean()
        if mode == "paper":
            if s.shape != t.shape:
                raise ValueError(f"ft_loss (paper): expected factors of the same shape, found "
                                 f"{tuple(s.shape)} and {tuple(t.shape)}")
            return (F.normalize(s.flatten(1), dim=1) - F.normalize(t.flatten(1), dim=1)).abs(
            ).mean()
    raise ValueError(f"ft_loss: expected mode 'code' or 'paper', found {mode!r}")


@dataclass
class FTOptions:
    """Config keys of ``method: {name: ft, ...}``."""

    ce_weight: float = 1.0
    beta: float = 200.0
    mode: FTMode = "code"
    paraphraser_epochs: int = 30
    paraphraser_lr: float | None = None  # None: the run's optim.lr
    rate: float = 0.5  # k: factor channels = floor(k·C_t)
    stage: int = -1
    translator_bn: bool = True

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if self.mode not in ("code", "paper"):
            raise ValueError(f"mode: expected 'code' or 'paper', found {self.mode!r}")
        if self.paraphraser_epochs < 1:
            raise ValueError(f"paraphraser_epochs: expected >= 1, found "
                             f"{self.paraphraser_epochs}")
        if self.paraphraser_lr is not None and not self.paraphraser_lr > 0:
            raise ValueError(f"paraphraser_lr: expected a learning rate > 0 or null (the "
                             f"run's optim.lr), found {self.paraphraser_lr}")
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate: expected 0 < rate <= 1, found {self.rate}")


@METHODS.register("ft")
class FT(Method):
    """Paraphraser pre-training on the teacher, then factor transfer (module docstring)."""

    Options = FTOptions

    @classmethod
    def requirements(cls, opts: FTOptions) -> Requirements:
        return Requirements(teacher_fields=(), student_stages=(opts.stage,),
                            teacher_stages=(opts.stage,))

    @classmethod
    def phases(cls, opts: FTOptions) -> tuple[Phase, ...]:
        return (Phase(PARAPHRASER_PHASE, opts.paraphraser_epochs, opts.paraphraser_lr,
                      uses_student=False),)

    def __init__(self, opts: FTOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        (s,), (t,) = ctx.student_maps((opts.stage,)), ctx.teacher_maps((opts.stage,))
        self.student_index, self.teacher_index = s.index, t.index
        factor = int(t.channels * opts.rate)
        if factor < 1:
            raise ValueError(f"method ft: rate {opts.rate} leaves no factor channel of the "
                             f"teacher's {t.channels}")
        self.paraphraser = Paraphraser(t.channels, factor)
        self.translator = _encoder(s.channels, factor, bn=opts.translator_bn)

    def phase_parameters(self, phase: Phase, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def train(self, mode: bool = True) -> FT:
        super().train(mode)
        if self.phase == MAIN_PHASE:
            self.paraphraser.eval()  # frozen: RepDistiller loops.py#L78-79
        return self

    def set_phase(self, name: str) -> None:
        super().set_phase(name)
        self.train(self.training)

    def _teacher_map(self, teacher: TeacherOutput | None) -> Tensor:
        if teacher is None or teacher.feats is None:
            raise ValueError("method ft: expected the teacher's stage map, found none")
        return teacher.feats[self.teacher_index]

    def forward(  # type: ignore[override]
        self, student: ModelOutput | None, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        f_t = self._teacher_map(teacher)
        if self.phase == PARAPHRASER_PHASE:
            target = f_t.float()
            rec = self.paraphraser(target)
            return {"reconstruction": F.mse_loss(rec.float(), target)}
        if student is None or student.feats is None:
            raise ValueError("method ft: expected the student's stage map, found none")
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(f_t.float())
        factor_s = self.translator(student.feats[self.student_index])
        terms: dict[str, Tensor] = {}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        terms["ft"] = self.opts.beta * ft_loss(factor_s, factor_t, self.opts.mode)
        return terms
