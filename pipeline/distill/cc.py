"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, ICCV 2019, "Correlation Congruence for
Knowledge Distillation" (baselines.md §4).

Loss as RepDistiller codes it, the simplified form the CC authors supplied (RD
``distiller_zoo/CC.py#L8-17``; embeddings ``train_student.py#L211-218``, ``models/util.py#L185-194``
``LinearEmbed``)::

    e_s = W_s h_s + b_s,   e_t = W_t h_t + b_t          (Linear(d → 128) each, no normalisation)
    Δ   = |e_s − e_t|                                   (B × 128, elementwise)
    L   = 1/(B−1) · Σ_{b=0}^{B−2} Σ_d Δ_{b,d} · Δ_{b+1,d}

h_s and h_t are the pooled penultimate embeddings (RD ``feat[-1]``; on ImageNet the pooled
512/2048-d vector, baselines.md §4 [I]). The loss couples **consecutive samples in batch
order** only; both embeddings are trained with the student (the teacher's embedding layer gets
gradients too) and saved with the method. A batch of one sample has no pair: the loss is 0.

Paper vs code: the paper matches B×B correlation matrices of the embeddings under a
Taylor-approximated Gaussian RBF kernel; torchdistill's ``CCKDLoss`` implements that form (with
a non-squared ``torch.dist``) and is not this loss. Spec §5's "Linear + L2 norm" embedding is
wrong: ``LinearEmbed`` has no normalisation. The loss mixes samples: under data parallelism it
is computed on each process's own batch (baselines.md §0.4).

Terms: ``ce`` = ce_weight·CE(z_s, y) (only when ce_weight > 0) and ``cc`` = beta·L.
Defaults: ce_weight 1, beta 0.02 (RD ``scripts/run_cifar_distill.sh#L13``), feat_dim 128.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.distill.stage_maps import widen
from pipeline.types import Batch, ModelOutput, TeacherOutput


def cc_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """1/(B−1)·Σ_b Σ_d Δ_b,d·Δ_b+1,d with Δ = |e_s − e_t| (module docstring)."""
    if e_s.shape != e_t.shape or e_s.dim() != 2:
        raise ValueError(f"cc: expected two (B, d) embeddings of one shape, found "
                         f"{tuple(e_s.shape)} and {tuple(e_t.shape)}")
    delta = (widen(e_s) - widen(e_t)).abs()
    if delta.shape[0] < 2:
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(1).mean()


@dataclass
class CCOptions:
    """Config keys of ``method: {name: cc, ...}``."""

    ce_weight: float = 1.0
    beta: float = 0.02
    feat_dim: int = 128

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if self.feat_dim < 1:
            raise ValueError(f"feat_dim: expected >= 1, found {self.feat_dim}")


@METHODS.register("cc")
class CC(Method):
    """Correlate the student's and teacher's embedding errors of neighbouring samples."""

    Options = CCOptions

    @classmethod
    def requirements(cls, opts: CCOptions) -> Requirements:
        return Requirements(teacher_fields=("embedding",), uses_student_logits=opts.ce_weight > 0)

    def __init__(self, opts: CCOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method cc: needs the teacher's embedding size, but the run has no "
                             "teacher (set teacher.arch)")
        self.embed_s = nn.Linear(ctx.student_dim, opts.feat_dim)
        self.embed_t = nn.Linear(ctx.teacher_dim, opts.feat_dim)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.embedding is None:
            raise ValueError("method cc: expected the teacher's embedding, found none")
        h_t = teacher.embedding.to(self.embed_t.weight.dtype)
        e_s, e_t = self.embed_s(student.embedding.flatten(1)), self.embed_t(h_t.flatten(1))
        terms = {"cc": self.opts.beta * cc_loss(e_s, e_t)}
        if self.opts.ce_weight > 0:
            terms = {"ce": self.opts.ce_weight * cross_entropy(student.logits, batch.labels),
                     **terms}
        return terms
