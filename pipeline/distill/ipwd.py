"""IPWD: Niu, Chen, Zhou & Zhang, NeurIPS 2022, "Respecting Transfer Gap in Knowledge
Distillation" (inverse probability weighting distillation; specs/methods.md §2).

**Provenance.** No official code is known and the main paper's method section was not available
(spec §2). Verified from the appendix [P]: IPWD reweights the logit KD loss per sample, with
weights estimated from two outputs of the student: y^kd from its original head (trained with
KD) and y^cls from an extra head on the shared backbone trained with CE. Everything else here is
the project's recommendation (spec §2.3, [I]); the open questions are listed in spec §7.1.

Loss (spec §2.3 [I])::

    L = ce_weight·CE(z_kd, y) + kd_weight·(1/B)·Σ_b w_b·T²·KL(σ(z_t/T) ‖ σ(z_kd/T))_b
        + CE(g_cls(h), y)

returned as the terms ``ce``, ``kd`` (already weighted by w) and ``cls_ce``. z_kd is the
student's own head (``student.logits``), which is also what evaluation uses; g_cls =
Linear(d_s, C) is owned by this method and trained by ``cls_ce`` only. By default it sees
h.detach() (``cls_head_grad: false``), so the backbone is trained exactly as in KD; ``true``
lets ``cls_ce`` reach the backbone (the ablation of spec §2.3).

Weights, computed with no gradient, from the T = 1 cross-entropies H_kd = −log σ(z_kd)_y and
H_cls = −log σ(z_cls)_y:

- ``weight_rule: propensity`` (default, [I]): with equal priors on the latent "machine" (KD head)
  and "human" (CE head) domains, P(machine | x, y) = p_m / (p_m + p_h), whose inverse is
  w = 1 + p_h/p_m = 1 + exp(H_kd − H_cls). Samples the KD head under-represents get large
  weights. The weights are kept as logarithms, log w = logaddexp(0, H_kd − H_cls) in float64,
  and normalised in log space (below), so the spec's formula holds for any logits: with very
  confident heads H_kd − H_cls can exceed 700, where exp overflows even float64, and the
  sample with the largest log-ratio gets the mass the formula gives it, not a tie with others.
- ``weight_rule: summary`` ([3P], a secondary summary of the paper, never the default):
  w = 1 + H_cls/(H_kd + 1e-7). Its direction contradicts the IPW reasoning above; spec §2.2
  says plainly that the direction is not settled, and so do we.
- ``standardize_logits: true`` (default; "logit normalisation is crucial" per the summary, the
  method is our choice [I]): each head's logits are standardised per sample over classes,
  (z − mean_c z) / std_c z with the population std (floored at 1e-6), before the softmax of
  the weight estimate only. The loss terms use the raw logits.
- Normalisation then clipping (spec §2.3, in that order): w ← w·N/Σw with Σw and N summed over
  **all processes**, so the global mean is exactly 1 before clipping. In log space:
  w_i·N/Σ_j w_j = exp(log w_i − M − log Σ_j exp(log w_j − M) + log N), where M, the largest
  log w of any process, is agreed first (``all_reduce`` MAX) and Σ_j and N are then summed over
  the processes (``all_reduce_sum``): a logsumexp across processes. Then
  w ← clip(w, 0, w_max), w_max = 10. After clipping the mean can be below 1; we do not
  renormalise (doing so could push weights back above w_max). ``weight_clipped`` in the epoch
  metrics says how often clipping acted.
- Warm-up (spec §2.3, an assumption [I]): w = 1 while ``epoch < warmup_epochs`` (0-based) so
  that g_cls becomes informative first; g_cls trains from the first epoch. ``warmup_epochs: -1``
  means floor(5/240·epochs + 0.5): 5 of 240 epochs on CIFAR; on 100 ImageNet epochs this gives
  2, while the spec suggests 1, so ImageNet configs should set ``warmup_epochs: 1``. Runs of
  fewer than 24 epochs get no warm-up.

Defaults T = 4, ce_weight = 0.1, kd_weight = 0.9 follow KD (RepDistiller), as spec §2.3 says
for CIFAR; the weights of the paper are unknown.

Diagnostics: ``epoch_metrics()`` returns the mean, std (population), max and fraction clipped
of the weights actually used in training during the last epoch, summed over all processes in
``end_epoch`` (a collective). The accumulators are plain attributes, not buffers: they are not
broadcast by DDP nor saved in checkpoints, so after a mid-epoch resume the epoch's figures cover
only the steps after the resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.dist import all_reduce_sum, is_distributed
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy, kd_loss_per_sample
from pipeline.distill.options import check_at_least, check_choice, check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

WeightRule = Literal["propensity", "summary"]

CODE_WARMUP, CODE_EPOCHS = 5, 240  # spec §2.3: 5 warm-up epochs of 240 on CIFAR
SUMMARY_EPS = 1e-7  # ε of the summary rule (spec §2.3)
STD_FLOOR = 1e-6  # keeps the standardisation finite for constant logits


def auto_warmup_epochs(epochs: int) -> int:
    """5 warm-up epochs of 240 scaled to ``epochs``, rounded half up."""
    return max(0, math.floor(CODE_WARMUP / CODE_EPOCHS * epochs + 0.5))


def warmup_for(opts: IPWDOptions, epochs: int) -> int:
    """The warm-up epochs of a run of ``epochs``: the option, or the auto rule for -1."""
    return auto_warmup_epochs(epochs) if opts.warmup_epochs < 0 else opts.warmup_epochs


def standardize_logits(logits: Tensor) -> Tensor:
    """(z − mean_c z) / std_c z per row, population std floored at ``STD_FLOOR`` (float64)."""
    z = logits.to(torch.float64)
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, correction=0, keepdim=True).clamp_min(STD_FLOOR)
    return (z - mean) / std


@torch.no_grad()
def ipwd_log_weights(
    kd_logits: Tensor,
    cls_logits: Tensor,
    labels: Tensor,
    rule: WeightRule = "propensity",
    standardize: bool = True,
) -> Tensor:
    """log of the unnormalised IPWD weights, shape (B,), float64, without gradient.

    Args:
        kd_logits: z_kd, the student's original (KD-trained) head, shape (B, C).
        cls_logits: z_cls, the extra CE-trained head, shape (B, C).
        labels: y, shape (B,).
        rule: ``propensity`` (log(1 + exp(H_kd − H_cls)), as logaddexp) or ``summary``
            (log1p(H_cls/(H_kd + ε))).
        standardize: standardise each head's logits over classes before the softmax.
    """
    if kd_logits.shape != cls_logits.shape or kd_logits.dim() != 2:
        raise ValueError(
            "ipwd: expected kd and cls logits of the same shape (B, C), found "
            f"{tuple(kd_logits.shape)} and {tuple(cls_logits.shape)}"
        )
    z_kd = kd_logits.detach().to(torch.float64)
    z_cls = cls_logits.detach().to(torch.float64)
    if standardize:
        z_kd, z_cls = standardize_logits(z_kd), standardize_logits(z_cls)
    h_kd = F.cross_entropy(z_kd, labels.long(), reduction="none")
    h_cls = F.cross_entropy(z_cls, labels.long(), reduction="none")
    if rule == "propensity":
        return torch.logaddexp(torch.zeros_like(h_kd), h_kd - h_cls)
    if rule == "summary":
        return torch.log1p(h_cls / (h_kd + SUMMARY_EPS))
    raise ValueError(f"ipwd: expected weight_rule 'propensity' or 'summary', found {rule!r}")


@torch.no_grad()
def ipwd_raw_weights(
    kd_logits: Tensor,
    cls_logits: Tensor,
    labels: Tensor,
    rule: WeightRule = "propensity",
    standardize: bool = True,
) -> Tensor:
    """The unnormalised weights exp(``ipwd_log_weights``), float64 (inf where log w > ~709;
    training normalises the logarithms instead, see ``normalize_and_clip_log``)."""
    return ipwd_log_weights(kd_logits, cls_logits, labels, rule, standardize).exp()


@torch.no_grad()
def normalize_and_clip_log(log_weights: Tensor, w_max: float) -> tuple[Tensor, Tensor]:
    """Weights with logarithms ``log_weights`` scaled to mean 1 over all processes' samples,
    then clipped to [0, w_max]; the scaling is a logsumexp across processes (module docstring).

    Collective when distributed: every process must call it (an empty batch included). Returns
    (the weights, float32, and a boolean mask of the samples whose normalised weight exceeded
    ``w_max``).
    """
    lw = log_weights.to(torch.float64)
    top = lw.max() if lw.numel() else lw.new_tensor(-math.inf)
    top = _all_reduce_max(top.reshape(1).clone())[0]
    # M is kept on the device (no host sync per step); -inf only when no process has a sample.
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    totals = torch.stack([torch.exp(lw - shift).sum(), lw.new_tensor(float(lw.numel()))])
    all_reduce_sum(totals)
    normed = torch.exp(lw - shift - torch.log(totals[0]) + torch.log(totals[1]))
    clipped = normed > w_max
    return normed.clamp(0.0, w_max).float(), clipped


@torch.no_grad()
def normalize_and_clip(weights: Tensor, w_max: float) -> tuple[Tensor, Tensor]:
    """``normalize_and_clip_log`` of plain (positive) weights."""
    return normalize_and_clip_log(weights.to(torch.float64).log(), w_max)


@dataclass
class IPWDOptions:
    """Config keys of ``method: {name: ipwd, ...}``."""

    T: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    weight_rule: WeightRule = "propensity"
    standardize_logits: bool = True
    w_max: float = 10.0
    warmup_epochs: int = -1  # -1: floor(5/240·epochs + 0.5)
    cls_head_grad: bool = False

    def __post_init__(self) -> None:
        # The config loader reports a ValueError here as "<file>: method.<key>: <message>".
        check_temperature(self.T)
        check_weights(self, "ce_weight", "kd_weight")
        check_choice(self, "weight_rule", ("propensity", "summary"))
        check_at_least(self, "w_max", 1, "a clip value (the mean weight is 1)")
        if self.warmup_epochs < -1:
            raise ValueError(f"warmup_epochs: expected -1 (auto) or >= 0, found "
                             f"{self.warmup_epochs}")


def _all_reduce_max(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@METHODS.register("ipwd")
class IPWD(Method):
    """KD with per-sample inverse-probability weights from a KD head and a CE head."""

    Options = IPWDOptions
    needs = Requirements(teacher_fields=("logits",))

    @classmethod
    def check_run(cls, opts: IPWDOptions, epochs: int) -> None:
        warmup = warmup_for(opts, epochs)
        if epochs > 0 and warmup >= epochs:
            raise ValueError(f"warmup_epochs: {warmup} leaves none of the {epochs} epochs with "
                             "IPWD weights (that run is KD plus an unused head)")

    def __init__(self, opts: IPWDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        self.check_run(opts, ctx.epochs)
        self.warmup_epochs = warmup_for(opts, ctx.epochs)
        self.g_cls = nn.Linear(ctx.student_dim, ctx.num_classes)
        # [Σw, Σw², number clipped, count] and max of the weights used this epoch (rank-local).
        self._sums: Tensor | None = None
        self._max: Tensor | None = None
        self._metrics: dict[str, float] = {}

    def weights(
        self, kd_logits: Tensor, cls_logits: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The weights used for this batch and the mask of clipped samples (collective after
        warm-up)."""
        if self.epoch < self.warmup_epochs:
            ones = torch.ones(labels.shape[0], device=kd_logits.device)
            return ones, torch.zeros_like(ones, dtype=torch.bool)
        log_w = ipwd_log_weights(
            kd_logits, cls_logits, labels, self.opts.weight_rule, self.opts.standardize_logits
        )
        return normalize_and_clip_log(log_w, self.opts.w_max)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("method ipwd: expected teacher logits, found none")
        h = student.embedding if self.opts.cls_head_grad else student.embedding.detach()
        z_cls = self.g_cls(h)
        w, clipped = self.weights(student.logits, z_cls, batch.labels)
        if self.training:
            self._accumulate(w, clipped)
        kd = (w * kd_loss_per_sample(student.logits, teacher.logits, self.opts.T)).mean()
        return {
            "ce": self.opts.ce_weight * cross_entropy(student.logits, batch.labels),
            "kd": self.opts.kd_weight * kd,
            "cls_ce": cross_entropy(z_cls, batch.labels),
        }

    @torch.no_grad()
    def _accumulate(self, w: Tensor, clipped: Tensor) -> None:
        w = w.double()
        step = torch.stack(
            [w.sum(), (w * w).sum(), clipped.double().sum(), w.new_tensor(float(w.numel()))]
        )
        step_max = w.max() if w.numel() else w.new_tensor(-math.inf)
        if self._sums is None or self._max is None:
            self._sums, self._max = step, step_max.clone()
        else:
            self._sums += step
            self._max = torch.maximum(self._max, step_max)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self._sums, self._max = None, None

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        """Collective: sum the epoch's weight statistics over all processes."""
        local = torch.tensor([0.0, 0.0, 0.0, 0.0, -math.inf], dtype=torch.float64,
                             device=self.g_cls.weight.device)
        if self._sums is not None and self._max is not None:
            local = torch.cat([self._sums, self._max.reshape(1)])
        sums, top = all_reduce_sum(local[:4].clone()), _all_reduce_max(local[4:].clone())
        total, total_sq, n_clipped, count = (float(v) for v in sums)
        self._sums, self._max = None, None
        if count == 0:
            self._metrics = {}
            return
        mean = total / count
        self._metrics = {
            "weight_mean": mean,
            "weight_std": math.sqrt(max(total_sq / count - mean * mean, 0.0)),
            "weight_max": float(top[0]),
            "weight_clipped": n_clipped / count,
        }

    def epoch_metrics(self) -> dict[str, float]:
        """Weight distribution of the last epoch (global): mean, std, max, fraction clipped."""
        return dict(self._metrics)
