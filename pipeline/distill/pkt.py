"""PKT: Passalis & Tefas, ECCV 2018, "Learning Deep Representations with Probabilistic
Knowledge Transfer".

The conditional probability that sample i picks sample j, from a cosine kernel over the batch's
pooled embeddings, should be the same under the student as under the teacher (baselines.md §7;
the paper's KL between conditional probabilities with the cosine kernel (cos(a, b) + 1)/2):

    x̂ = x / (‖x‖₂ + ε),  S = (x̂ x̂ᵀ + 1)/2,  P_ij = S_ij / Σ_k S_ik  (diagonal included),
    L = mean over all B² entries of P_t · ln((P_t + ε) / (P_s + ε)),  ε = 1e-7,

×β with β = 30000 (RepDistiller ``scripts/run_cifar_distill.sh#L19``). The B² mean is (1/B)·the
batch mean of the row KLs, hence the large β. This is RepDistiller
``distiller_zoo/PKT.py#L17-42`` (NaNs from an all-zero row are set to 0, as there);
torchdistill's ``PKTLoss(eps=1e-7)`` computes the same (baselines.md §0.5). The row sums keep
the diagonal (S_ii = 1), as the code does. Features: the pooled
penultimate vector on both networks (CIFAR and ImageNet: the fc input, torchdistill's ImageNet
sample). PKT mixes the samples of a batch: each process uses its own batch (baselines.md §0.4).

Terms: ``ce`` = ce_weight·CE (when ce_weight > 0) and ``pkt`` = β·L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

EPS = 1e-7


def _conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    x = x.reshape(x.shape[0], -1).float()
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    x = x.masked_fill(x.isnan(), 0.0)
    s = (x @ x.t() + 1.0) / 2.0
    return s / s.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = EPS) -> Tensor:
    """L of the module docstring.

    Args:
        student: (B, ...) student features, flattened per sample; gradients flow into it.
        teacher: (B, ...) teacher features (no gradient).
    Returns:
        A float32 scalar.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        p_s = _conditional_probabilities(student, eps)
        with torch.no_grad():
            p_t = _conditional_probabilities(teacher, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@dataclass
class PKTOptions:
    """Config keys of ``method: {name: pkt, ...}``."""

    ce_weight: float = 1.0
    beta: float = 30000.0

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")


@METHODS.register("pkt")
class PKT(Method):
    """Match the batch's cosine-kernel conditional probabilities (module docstring)."""

    Options = PKTOptions
    needs = Requirements(teacher_fields=("embedding",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.embedding is None:
            raise ValueError("method pkt: expected the teacher's embedding, found none")
        terms: dict[str, Tensor] = {}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        terms["pkt"] = self.opts.beta * pkt_loss(student.embedding, teacher.embedding)
        return terms
