"""The student and the method in one module, so one DDP wrapper syncs the gradients of both."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.distill.base import Method
from pipeline.models.base import Net
from pipeline.types import Batch, TeacherOutput


class Distiller(nn.Module):
    def __init__(self, student: Net, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method

    def forward(  # type: ignore[override]
        self, images: Tensor, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        """Only the loss terms leave: DDP searches the outputs for the tensors whose graph it
        walks, and an output that no loss uses (the logits under CoSS) would make it wait
        forever for the classifier's gradient."""
        out = self.student(images, feats=self.method.student_feats, preact=self.method.preact)
        return self.method(out, teacher, batch)

    def predict(self, images: Tensor) -> Tensor:
        out = self.student(images)
        return self.method.eval_logits(out)
