"""CoSS: Singh & Wang, ECCV 2024, "Simple Unsupervised Knowledge Distillation With Space
Similarity" (specs/methods.md §4.1–4.2; supplement Algorithm 1).

Student embedding A_s and teacher embedding A_t, both b × d (the student's after the projection
head when d_s ≠ d_t)::

    L_co = −(1/b)·Σ_i cos(A_s[i, :], A_t[i, :])     rows L2-normalised over the d features
    L_ss = −(1/d)·Σ_j cos(A_s[:, j], A_t[:, j])     columns L2-normalised over the b samples
    L    = beta·(lambda_co·L_co + lambda_ss·L_ss)

returned as the terms ``coss_co`` = beta·lambda_co·L_co and ``coss_ss`` = beta·lambda_ss·L_ss.

Choices and sources:

- L_ss is computed on the **raw** features (transpose, then normalise), not on the row-normalised
  ones, as the official code does [C `paganpasta/coss-pytorch` ``losses.py::coss``]. Both use
  ``F.normalize`` (p = 2, ε = 1e-12).
- **Pseudo-code bug** [P supplement, Algorithm 1]: its ``dot`` uses ``torch.norm(s, dim=-1)``,
  which returns the b row norms instead of normalised rows, so the "dot product" that follows is
  not a cosine. The official code uses ``F.normalize(·, p=2, dim=-1)``, and so do we.
- **Temperatures** (spec §4.1 [C]): the ImageNet ``coss()`` divides the *normalised* teacher
  vectors by t_temp = 0.07 and the student's by s_temp = 0.1, which multiplies both terms by
  1/(0.07·0.1) ≈ 142.86, a pure gain factor that interacts with the learning rate (0.03 there).
  The CIFAR code (``CoSSLossPreN``) divides *before* normalising, where the temperatures cancel.
  ``imagenet_temperature_scale: false`` (default) gives the plain cosine loss (the CIFAR code);
  ``true`` applies the ImageNet code's factor 1/(t_temp·s_temp) to both terms, which the spec
  asks for to reproduce the ImageNet runs. Whether the paper's own numbers include this factor
  is an open question (spec §7.4).
- Weights: ImageNet code lambda_co = lambda_ss = 1 (``--l_0 1 --l_1 1``), beta = 1 (our
  defaults); the CIFAR script uses beta = 50. The paper uses λ = 1 on L_ss for its main runs and
  finds 0.25–1 best depending on the pair (supplement Table 3).
- Projection head (spec §4.2 [C ``wrapper.py``]): only when d_s ≠ d_t,
  Linear(d_s, 2048) → ReLU → Linear(2048, d_t), owned and trained by this method; equal dims
  (all CIFAR pairs) use the student's embedding directly.
- Labels are never read: the method is unsupervised (no CE, no KD). Pair it with ``vanilla`` in
  ``compose`` for a supervised variant.
- Distributed: L_ss is computed per process over its local batch, with no gather, as in the code
  (spec §4.3). Its value therefore depends on the per-process batch size.
- Nearest-neighbour batches Ω^k (spec §4.3) are a sampler concern, not part of this loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

T_TEMP, S_TEMP = 0.07, 0.1  # ImageNet code: --t-temp 0.07 --s-temp 0.1
PROJ_HIDDEN = 2048  # wrapper.py's projection width


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            "coss: expected student and teacher embeddings of the same shape (b, d), found "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_co = −(1/b)·Σ_i cos(A_s[i], A_t[i]): rows normalised over features, float32 scalar."""
    _check_pair(student, teacher)
    s = F.normalize(student.float(), p=2, dim=1)
    t = F.normalize(teacher.float(), p=2, dim=1)
    return -(s * t).sum(dim=1).mean()


def space_similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_ss = −(1/d)·Σ_j cos(A_s[:, j], A_t[:, j]) on the raw features: each column (one feature
    across the batch) normalised over the b samples, float32 scalar."""
    _check_pair(student, teacher)
    s = F.normalize(student.float(), p=2, dim=0)
    t = F.normalize(teacher.float(), p=2, dim=0)
    return -(s * t).sum(dim=0).mean()


@dataclass
class CoSSOptions:
    """Config keys of ``method: {name: coss, ...}`` (defaults: the ImageNet code's weights)."""

    beta: float = 1.0
    lambda_co: float = 1.0
    lambda_ss: float = 1.0
    imagenet_temperature_scale: bool = False  # true: × 1/(0.07·0.1), the ImageNet code's gain

    def __post_init__(self) -> None:
        # The config loader reports a ValueError here as "<file>: method.<key>: <message>".
        check_weights(self, "beta", "lambda_co", "lambda_ss")


@METHODS.register("coss")
class CoSS(Method):
    """Unsupervised distillation: per-sample cosine plus per-feature (space) similarity."""

    Options = CoSSOptions
    # label-free: the classifier gets no gradient
    needs = Requirements(teacher_fields=("embedding",), uses_student_logits=False)

    def __init__(self, opts: CoSSOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method coss: needs the teacher's embedding size, found none")
        self.proj: nn.Module | None = None
        if ctx.student_dim != ctx.teacher_dim:
            self.proj = nn.Sequential(
                nn.Linear(ctx.student_dim, PROJ_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(PROJ_HIDDEN, ctx.teacher_dim),
            )
        self.scale = opts.beta / (T_TEMP * S_TEMP) if opts.imagenet_temperature_scale else opts.beta

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        # ``batch`` is deliberately unused: CoSS never sees labels.
        if teacher is None or teacher.embedding is None:
            raise ValueError("method coss: expected the teacher's embedding, found none")
        a_s = student.embedding if self.proj is None else self.proj(student.embedding)
        a_t = teacher.embedding
        return {
            "coss_co": self.scale * self.opts.lambda_co * cosine_loss(a_s, a_t),
            "coss_ss": self.scale * self.opts.lambda_ss * space_similarity_loss(a_s, a_t),
        }
