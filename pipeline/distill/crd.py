"""CRD: Tian, Krishnan & Isola, ICLR 2020, "Contrastive Representation Distillation"
(baselines.md §11; RepDistiller ``crd/criterion.py#L23-102``, ``crd/memory.py#L10-79``,
``dataset/cifar100.py#L95-169``).

L = ce_weight·CE(z_s, y) + beta·(L_NCE(out_s) + L_NCE(out_t)), eq. 18 of the paper with the
memory bank, as RepDistiller codes it:

- embeddings e_s = normalise(W_s h_s), e_t = normalise(W_t h_t): Linear(d, feat_dim) heads on
  the pooled penultimate vectors of both networks, L2-normalised without eps, **both trained**
  with the student (weight decay like every parameter, RepDistiller ``train_student.py#L190``);
- out_s, out_t: the (B, K+1) scores of ``crd_memory.ContrastMemory`` divided by Z (column 0 the
  positive, the sample itself: "exact" mode), Z frozen after the first step;
- L_NCE(x) = −(1/B)·[Σ_b ln(x_b0 / (x_b0 + m·P_n + ε)) + Σ_{b,k≥1} ln(m·P_n / (x_bk + m·P_n + ε))]
  with m = K, P_n = 1/N, ε = 1e-7 (``criterion.py#L51-76``);
- then both banks move towards this step's embeddings (momentum ``nce_m``).

Terms: ``ce`` (when ``ce_weight`` > 0) and ``crd``. Defaults: feat_dim 128, K = 16384,
T = 0.07, momentum 0.5 (``train_student.py#L81-85``), β = 0.8 (``run_cifar_distill.sh``).

Where this differs from the reference code (and why):
- Negatives: RepDistiller's CIFAR dataset draws them per item without replacement, its
  ImageNet loader with replacement: ``negatives`` picks either. They come from a generator
  seeded by (``seed``, step), drawn for the global batch, not from the data loader's workers,
  so a resumed run and a run on more processes draw the same ones (``crd_memory``).
- K is capped at ``k_cap_fraction`` (default 1/3) of the smallest other-class pool N − n_max:
  no effect on CIFAR-100 (16384 ≤ 16500) or ImageNet; on the 4,000-sample demo data K = 1194
  instead of drawing more negatives than there are samples.
- Several processes: the banks stay identical on every process (all-gathered updates) and Z
  is computed from the global first batch; RepDistiller runs one process.
- The whole loss is computed in float32 with autocast off (exp(⟨·⟩/0.07) overflows float16).
- Banks, Z and the step count are checkpointed (RepDistiller saves only the student). On
  ImageNet the banks take 2 × 1,281,167 × 128 × 4 B = 1.31 GB (1.22 GiB) in memory, in
  ``last.pt`` and in ``method.pt``, kept in float32 so that a resume is exact.

With a teacher cache the method reads only the teacher's embedding (``cache_fields:
[embedding]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.distill.crd_memory import (
    WITH_REPLACEMENT,
    WITHOUT_REPLACEMENT,
    ContrastMemory,
    effective_k,
)
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

EPS = 1e-7
MAX_SAMPLES_WITHOUT_REPLACEMENT = 200_000  # B·N uniforms per step: fine for CIFAR, not ImageNet


@dataclass
class CRDOptions:
    """Config keys of ``method: {name: crd, ...}``."""

    ce_weight: float = 1.0
    beta: float = 0.8
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    k_cap_fraction: float = 1 / 3
    negatives: Literal["without_replacement", "with_replacement"] = WITHOUT_REPLACEMENT
    seed: int = -1  # -1: the run's seed (torch.initial_seed() when the method is built)

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        check_temperature(self.nce_t, "nce_t")
        for key in ("feat_dim", "nce_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected an integer >= 1, found {getattr(self, key)}")
        if not 0 <= self.nce_m < 1:
            raise ValueError(f"nce_m: expected a momentum in [0, 1), found {self.nce_m}")
        if not 0 < self.k_cap_fraction <= 1:
            raise ValueError(f"k_cap_fraction: expected a fraction in (0, 1], found "
                             f"{self.k_cap_fraction}")
        if self.negatives not in (WITHOUT_REPLACEMENT, WITH_REPLACEMENT):
            raise ValueError(f"negatives: expected one of {[WITHOUT_REPLACEMENT, WITH_REPLACEMENT]}"
                             f", found {self.negatives!r}")
        if self.seed < -1:
            raise ValueError(f"seed: expected -1 (the run's seed) or >= 0, found {self.seed}")


def nce_loss(x: Tensor, num_samples: int, eps: float = EPS) -> Tensor:
    """RepDistiller's ContrastLoss on Z-normalised scores ``x`` (B, K+1), column 0 the positive
    (module docstring)."""
    b, m = x.shape[0], x.shape[1] - 1
    noise = m / num_samples  # m·P_n
    log_pos = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_neg = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / b


def l2_normalise(x: Tensor) -> Tensor:
    """RepDistiller's ``Normalize``: x / ‖x‖₂ per row, no eps."""
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


@METHODS.register("crd")
class CRD(Method):
    """Contrastive representation distillation with memory banks. Terms: ``ce``, ``crd``."""

    Options = CRDOptions

    @classmethod
    def requirements(cls, opts: CRDOptions) -> Requirements:
        return Requirements(teacher_fields=("embedding",), uses_student_logits=opts.ce_weight > 0)

    def __init__(self, opts: CRDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        labels = ctx.train_labels
        if labels is None or ctx.num_train_samples < 1 or len(labels) != ctx.num_train_samples:
            raise ValueError(
                "method crd: expected the training labels of all num_train_samples samples in "
                f"the method context, found {None if labels is None else len(labels)} labels "
                f"for {ctx.num_train_samples} samples")
        if ctx.teacher_dim is None:
            raise ValueError("method crd: expected the teacher's embedding size, found none")
        n = ctx.num_train_samples
        if opts.negatives == WITHOUT_REPLACEMENT and n > MAX_SAMPLES_WITHOUT_REPLACEMENT:
            raise ValueError(
                f"method crd: negatives: {WITHOUT_REPLACEMENT} draws B·N = B·{n} numbers per "
                f"step; above {MAX_SAMPLES_WITHOUT_REPLACEMENT} samples use {WITH_REPLACEMENT} "
                "(as RepDistiller's ImageNet loader does)")
        labels = torch.as_tensor(labels).long()
        self.embed_s = nn.Linear(ctx.student_dim, opts.feat_dim)
        self.embed_t = nn.Linear(int(ctx.teacher_dim), opts.feat_dim)
        seed = torch.initial_seed() if opts.seed < 0 else opts.seed
        k = effective_k(labels, opts.nce_k, opts.k_cap_fraction)
        self.memory = ContrastMemory(labels, opts.feat_dim, k, opts.nce_t, opts.nce_m,
                                     opts.negatives, seed)
        mark_rank_local_buffers(self)

    def embed(self, student: ModelOutput, teacher: TeacherOutput | None) -> tuple[Tensor, Tensor]:
        """(e_s, e_t): the normalised float32 embeddings of both networks."""
        if teacher is None or teacher.embedding is None:
            raise ValueError("method crd: expected the teacher's embedding, found none")
        e_s = l2_normalise(self.embed_s(student.embedding.float()))
        e_t = l2_normalise(self.embed_t(teacher.embedding.float()))
        return e_s, e_t

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        device_type = student.embedding.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            e_s, e_t = self.embed(student, teacher)
            contrast_idx = self.memory.contrast_indices(batch.index)
            out_s, out_t = self.memory.scores(e_s, e_t, contrast_idx)
            n = self.memory.num_samples
            loss = nce_loss(out_s, n) + nce_loss(out_t, n)
            if self.training:
                self.memory.update(e_s, e_t)
        terms = {"crd": self.opts.beta * loss}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms

    def end_epoch(self, epoch: int) -> None:
        self.memory.check_replicas()

    def epoch_metrics(self) -> dict[str, float]:
        """K after the cap and the two normalisation constants."""
        z = self.memory.z.tolist()
        return {"nce_k": float(self.memory.k), "z_student": z[0], "z_teacher": z[1]}

