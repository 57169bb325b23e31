"""KD: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

L = ce_weight·CE(z_s, y) + kd_weight·T²·KL(σ(z_t/T) ‖ σ(z_s/T)), the KL summed over classes and
averaged over the batch (specs/methods.md §5, KD row). Defaults follow RepDistiller
``train_student.py`` (``-r 0.1 -a 0.9 --kd_T 4``), which the CID, IPWD and MSE-teacher papers
reuse; mdistiller's ImageNet config instead uses T = 1 with weights 0.5 / 0.5.

Loss terms returned: ``{"ce": ce_weight·CE, "kd": kd_weight·KL·T²}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.distill.base import METHODS, Method
from pipeline.distill.losses import cross_entropy, kd_loss
from pipeline.distill.options import check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


@dataclass
class KDOptions:
    """Config keys of ``method: {name: kd, ...}``."""

    T: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def __post_init__(self) -> None:
        check_temperature(self.T)
        check_weights(self, "ce_weight", "kd_weight")


@METHODS.register("kd")
class KD(Method):
    """Match the teacher's temperature-softened class distribution."""

    Options = KDOptions
    needs = Requirements(teacher_fields=("logits",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("method kd: expected teacher logits, found none")
        ce = cross_entropy(student.logits, batch.labels)
        kd = kd_loss(student.logits, teacher.logits, self.opts.T)
        return {"ce": self.opts.ce_weight * ce, "kd": self.opts.kd_weight * kd}
