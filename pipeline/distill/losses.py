"""Pure loss functions shared by the distillation methods.

Every function here takes plain tensors and returns a tensor, so each is tested against an
independent float64 loop implementation without models, loaders or processes. Inputs are cast
to float32 (``.float()``) before any softmax, so the losses stay in float32 under autocast and
with fp16 logits read from a teacher cache.

Notation (specs/methods.md): B = batch size, C = number of classes, z = logits, T = temperature,
σ = softmax over classes.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

MseReduction = Literal["sum_classes", "mean"]


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor, where: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{where}: expected student and teacher logits of the same shape (B, C), found "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(T: float, where: str) -> None:
    if not T > 0:
        raise ValueError(f"{where}: expected a temperature T > 0, found {T!r}")


def kd_loss_per_sample(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Hinton KD term of each sample: T²·KL(σ(z_t/T) ‖ σ(z_s/T)), summed over classes.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", §2: the soft
    targets σ(z_t/T) are matched at temperature T and the term is multiplied by T² so that its
    gradient keeps the scale of the hard-label term as T changes.

    Args:
        student_logits: z_s, shape (B, C); gradients flow into it.
        teacher_logits: z_t, shape (B, C); any float dtype (a cache stores fp16). Entries of -inf
            (classes a top-k cache left out) get probability 0 and contribute 0.
        T: temperature, > 0.

    Returns:
        A float32 tensor of shape (B,): T²·Σ_c p_t,c·(log p_t,c − log p_s,c) per sample. IPWD and
        WSLD weight these per sample; ``kd_loss`` is their mean.
    """
    _check_logit_pair(student_logits, teacher_logits, "kd_loss")
    _check_temperature(T, "kd_loss")
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.float() / T, dim=1)
    # kl_div with a probability target computes xlogy(p_t, p_t) − p_t·log p_s, which is 0 where
    # p_t = 0, and its gradient with respect to log p_s is −p_t.
    return F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1) * (T * T)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Hinton KD loss: KL(σ(z_t/T) ‖ σ(z_s/T)) summed over classes, mean over the batch, × T².

    Hinton et al. 2015, §2; as implemented in RepDistiller ``distiller_zoo/KD.py`` (``DistillKL``:
    ``F.kl_div(log_softmax(z_s/T), softmax(z_t/T), reduction="sum") * T**2 / B``), the same as
    ``reduction="batchmean"``. Its gradient with respect to z_s is T·(σ(z_s/T) − σ(z_t/T))/B.

    Args:
        student_logits: z_s, shape (B, C).
        teacher_logits: z_t, shape (B, C).
        T: temperature, > 0 (RepDistiller CIFAR: 4; mdistiller ImageNet: 1).

    Returns:
        A float32 scalar.
    """
    return kd_loss_per_sample(student_logits, teacher_logits, T).mean()


def mse_prob_loss(
    logits: Tensor, labels: Tensor, reduction: MseReduction = "sum_classes"
) -> Tensor:
    """Squared error between the one-hot label and the softmax probabilities.

    Hamidi et al., ECCV 2024, "How to Train the Teacher Model for Effective Knowledge
    Distillation", supplement eq. 1 (specs/methods.md §3.1):
    ℓ_MSE(x, y) = Σ_{c=1..C} (onehot(y)_c − σ(z)_c)², with σ at T = 1.

    Args:
        logits: z, shape (B, C).
        labels: y, shape (B,), integer class indices in [0, C).
        reduction: ``"sum_classes"`` (the paper): (1/B)·Σ_b Σ_c (…)², the batch mean of ℓ_MSE.
            ``"mean"``: divide the same sum by B·C, the scale of ``nn.MSELoss()`` in the authors'
            released code; it is C times smaller, so the learning rate may need retuning.

    Returns:
        A float32 scalar.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"mse_prob_loss: expected logits (B, C) and labels (B,), found "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), num_classes).to(probs.dtype)
    squared = (onehot - probs).pow(2)
    if reduction == "sum_classes":
        return squared.sum(dim=1).mean()
    if reduction == "mean":
        return squared.mean()
    raise ValueError(
        f"mse_prob_loss: expected reduction 'sum_classes' or 'mean', found {reduction!r}"
    )


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy −log σ(z)_y averaged over the batch, computed in float32.

    Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture", §7) mixes the
    one-hot target with the uniform distribution: (1 − ε)·onehot(y) + ε/C.
    """
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


__all__ = [
    "MseReduction",
    "cross_entropy",
    "kd_loss",
    "kd_loss_per_sample",
    "mse_prob_loss",
]
