"""KD+LA: Hinton KD with logit adjustment on the student's output, IPWD's long-tail comparison.

IPWD (Niu et al., NeurIPS 2022) appendix §2.3: "Following LA, we applied the class prior to the
student output when calculating the KL divergence distillation loss"; it reports that KD+LA
underperforms KD by 0.5 % on average on CIFAR-100. LA is the logit-adjusted loss of Menon et al.,
ICLR 2021, "Long-tail learning via logit adjustment" (eq. 10): the logits f(x) are trained as
f(x) + τ·log π, with π the class prior, and predict with f(x) alone. Applied to KD's KL:

    L = ce_weight·CE(z_s, y) + kd_weight·T²·KL(σ(z_t/T) ‖ σ((z_s + τ·log π)/T))

with KD's other choices unchanged (RepDistiller's 0.1 / 0.9 at T = 4, as IPWD's KD). Evaluation
uses the unadjusted logits (LA's prediction rule).

The prior comes from the run's training labels (``MethodContext.train_labels``), so a training
set with dropped classes or a fraction of the data gets its own prior: π_c = (n_c + s) / (N + C·s)
with ``prior_smoothing`` s pseudo-counts per class (default 1, Laplace), which keeps a class with
no training sample finite (log 0 would make the KL infinite wherever the teacher gives it mass)
and leaves a balanced prior uniform; s = 0 is the plain frequency and refuses empty classes.

Choices the appendix does not pin down, offered as options: ``la_tau`` (LA's τ, default 1),
``prior_inside_temperature`` (default True: the prior is added to the logits before the division
by T, i.e. the adjusted logits are distilled like any logits; False: σ(z_s/T + τ·log π)), and
``adjust_ce`` (default False: the appendix adjusts only the KL; True also trains the CE with the
adjusted logits, i.e. LA's own loss).

Note: on a class-balanced training set (CIFAR-100, ImageNet) the label prior is uniform, log π is
a constant, and σ is shift-invariant, so KD+LA equals KD exactly. IPWD's reported gap therefore
suggests a non-uniform prior (perhaps one estimated from the teacher's predictions, IPWD's
"machine domain"); the appendix does not say which, and this method implements the label prior.

Terms: ``ce`` (when ce_weight > 0), ``kd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy, kd_loss
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


def class_log_prior(labels: Tensor, num_classes: int, smoothing: float = 1.0) -> Tensor:
    """log π of the training labels: π_c = (n_c + s) / (N + C·s) (module docstring), float64."""
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"kd_la: training labels must lie in 0..{num_classes - 1}, found "
                         f"{int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes).double() + smoothing
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prior_smoothing: 0 leaves classes {empty} without any training sample "
                         "and a prior of 0 (log 0 = -inf); use prior_smoothing > 0")
    return (counts / counts.sum()).log()


@dataclass
class KDLAOptions:
    """Config keys of ``method: {name: kd_la, ...}`` (defaults: IPWD's KD, LA's τ = 1)."""

    T: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    la_tau: float = 1.0
    prior_smoothing: float = 1.0
    prior_inside_temperature: bool = True
    adjust_ce: bool = False

    def __post_init__(self) -> None:
        check_temperature(self.T)
        check_weights(self, "ce_weight", "kd_weight", "la_tau", "prior_smoothing")


@METHODS.register("kd_la")
class KDLA(Method):
    """KD whose student logits are adjusted by τ·log π (the training-label prior) in the KL."""

    Options = KDLAOptions
    needs = Requirements(teacher_fields=("logits",))

    def __init__(self, opts: KDLAOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.train_labels is None:
            raise ValueError("method kd_la: needs the training labels (MethodContext.train_labels)"
                             " for its class prior, found none")
        prior = class_log_prior(ctx.train_labels, ctx.num_classes, opts.prior_smoothing)
        # derived from the data at every start, so not saved in checkpoints
        self.register_buffer("log_prior", prior.float(), persistent=False)

    def adjusted(self, logits: Tensor) -> Tensor:
        """z + τ·log π (the form the CE uses with ``adjust_ce``)."""
        return logits.float() + self.opts.la_tau * self.log_prior

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("method kd_la: expected teacher logits, found none")
        o, z_s = self.opts, student.logits
        if o.prior_inside_temperature:
            kd = kd_loss(self.adjusted(z_s), teacher.logits, o.T)
        else:  # σ(z_s/T + τ·log π) = σ((z_s + T·τ·log π)/T)
            kd = kd_loss(z_s.float() + o.T * o.la_tau * self.log_prior, teacher.logits, o.T)
        terms = {"kd": o.kd_weight * kd}
        if o.ce_weight > 0:
            ce_logits = self.adjusted(z_s) if o.adjust_ce else z_s
            terms["ce"] = o.ce_weight * cross_entropy(ce_logits, batch.labels)
        return terms
