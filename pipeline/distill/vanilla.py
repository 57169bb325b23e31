"""Vanilla training: the student (or a teacher being trained) alone, no distillation.

Two objectives:
- ``ce``: cross-entropy, optionally with label smoothing (Szegedy et al. 2016, §7). The
  RepDistiller teacher recipe and the student-alone baselines of every paper use plain CE.
- ``mse``: Σ_c (onehot(y)_c − σ(z)_c)² averaged over the batch, the loss of the MSE-trained
  teacher (Hamidi et al., ECCV 2024, supplement eq. 1; specs/methods.md §3.1). The authors'
  released code never reaches its MSE branch (specs §3.1), so we follow the paper; the
  ``mse_reduction: mean`` option gives the B·C-mean scale of ``nn.MSELoss``.

Loss terms returned: ``{"ce": CE}`` or ``{"mse": MSE}``, unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy, mse_prob_loss
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


@dataclass
class VanillaOptions:
    """Config keys of ``method: {name: vanilla, ...}``."""

    objective: Literal["ce", "mse"] = "ce"
    label_smoothing: float = 0.0  # ce only; ε in [0, 1)
    mse_reduction: Literal["sum_classes", "mean"] = "sum_classes"  # mse only

    def __post_init__(self) -> None:
        # The config loader reports a ValueError here as "<file>: method: <message>".
        if self.objective not in ("ce", "mse"):
            raise ValueError(f"objective: expected 'ce' or 'mse', found {self.objective!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing: expected a value in [0, 1), found {self.label_smoothing}"
            )
        if self.objective == "mse" and self.label_smoothing != 0.0:
            raise ValueError(
                "label_smoothing: only used with objective 'ce', found "
                f"{self.label_smoothing} with objective 'mse'"
            )
        if self.mse_reduction not in ("sum_classes", "mean"):
            raise ValueError(
                f"mse_reduction: expected 'sum_classes' or 'mean', found {self.mse_reduction!r}"
            )


@METHODS.register("vanilla")
class Vanilla(Method):
    """Hard-label training without a teacher."""

    Options = VanillaOptions
    needs = Requirements(needs_teacher=False, teacher_fields=())

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if self.opts.objective == "ce":
            return {"ce": cross_entropy(student.logits, batch.labels, self.opts.label_smoothing)}
        return {"mse": mse_prob_loss(student.logits, batch.labels, self.opts.mse_reduction)}
