"""RKD: Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation".

The student's pooled embeddings should relate to each other as the teacher's do (baselines.md
§6), with two potentials over the batch of B embeddings e (the teacher side under ``no_grad``):

- distance-wise: ψ_D(e_i, e_j) = ‖e_i − e_j‖₂ / μ, μ the mean of the nonzero distances in
  the batch; L_D = smooth-L1 (Huber, δ = 1) between student and teacher ψ_D, mean over all B²
  pairs (diagonal included, where both are 0);
- angle-wise: ψ_A(e_i, e_j, e_k) = ⟨unit(e_j − e_i), unit(e_k − e_i)⟩, the cosine at vertex
  i (the zero vector where two points coincide); L_A = smooth-L1 mean over all B³ triplets.

L = β·(λ_D·L_D + λ_A·L_A) with λ_D = 25, λ_A = 50 (the paper's defaults) and β = 1
(RepDistiller ``scripts/run_cifar_distill.sh#L17``). This follows RepDistiller
``distiller_zoo/RKD.py#L10-58`` exactly: the distance as sqrt(max(‖a‖² + ‖b‖² − 2a·b, 1e-12))
with the diagonal set to 0, and ``F.normalize`` for the unit vectors (torchdistill's
``RKDLoss(25, 50, 'mean')`` computes the same, baselines.md §0.5). Features: the pooled
penultimate vector on both networks (CIFAR and ImageNet: the fc input; torchdistill's ImageNet
sample distils the flattened ``layer4`` map instead, a different setting).

RKD mixes the samples of a batch: under DDP each process computes it on its own batch
(baselines.md §0.4), as the official multi-GPU runs did. The angle term holds B³ floats.

Terms: ``ce`` = ce_weight·CE (when ce_weight > 0), ``rkd_distance`` = β·λ_D·L_D and
``rkd_angle`` = β·λ_A·L_A (each omitted when its λ is 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean distances with a zero diagonal (RepDistiller's ``pdist``)."""
    square = e.pow(2).sum(dim=1)
    d = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: Tensor) -> Tensor:
    """Distances over their mean where positive (``d[d > 0].mean()``, written without the
    device sync of boolean indexing). Off the diagonal d ≥ 1e-6 (the clamp), so the floor on
    the mean only turns a batch of one into zeros instead of NaN."""
    d = _pairwise_distances(e)
    positive = (d > 0).to(d.dtype)
    mean = (d * positive).sum() / positive.sum().clamp(min=1)
    return d / mean.clamp(min=1e-12)


def _angles(e: Tensor) -> Tensor:
    """(B, B, B): entry (i, j, k) is ⟨unit(e_j − e_i), unit(e_k − e_i)⟩."""
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = unit(e_j − e_i)
    return torch.bmm(u, u.transpose(1, 2))


def _flat32(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).float()


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_D (module docstring): smooth-L1 between the mean-normalised distance matrices.

    Args:
        student: (B, ...) student features, flattened per sample; gradients flow into it.
        teacher: (B, ...) teacher features (no gradient).
    Returns:
        A float32 scalar.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        with torch.no_grad():
            t = _normalised_distances(_flat32(teacher))
        return F.smooth_l1_loss(_normalised_distances(_flat32(student)), t)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_A (module docstring): smooth-L1 between the B³ angle cosines. Same arguments."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        with torch.no_grad():
            t = _angles(_flat32(teacher))
        return F.smooth_l1_loss(_angles(_flat32(student)), t)


@dataclass
class RKDOptions:
    """Config keys of ``method: {name: rkd, ...}``."""

    ce_weight: float = 1.0
    beta: float = 1.0
    distance_weight: float = 25.0  # λ_D
    angle_weight: float = 50.0  # λ_A

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta", "distance_weight", "angle_weight")


@METHODS.register("rkd")
class RKD(Method):
    """Distance and angle relations of the pooled embeddings (module docstring)."""

    Options = RKDOptions
    needs = Requirements(teacher_fields=("embedding",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.embedding is None:
            raise ValueError("method rkd: expected the teacher's embedding, found none")
        o = self.opts
        terms: dict[str, Tensor] = {}
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        if o.distance_weight > 0:
            terms["rkd_distance"] = o.beta * o.distance_weight * rkd_distance_loss(
                student.embedding, teacher.embedding)
        if o.angle_weight > 0:
            terms["rkd_angle"] = o.beta * o.angle_weight * rkd_angle_loss(
                student.embedding, teacher.embedding)
        return terms
