"""The student and the method in one module, so one DDP wrapper syncs the gradients of both."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pipeline.distill.base import Method
from pipeline.models.base import Net
from pipeline.types import Batch, ModelOutput, TeacherOutput


class Distiller(nn.Module):
    """``student_stages`` are the stage maps the method reads (indices resolved against the
    student's ``stage_info``); ``run_student`` is False during a phase that trains without the
    student (the method then gets ``None`` for the student's output)."""

    def __init__(self, student: Net, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.student_stages = method.needs.resolve_student(len(method.ctx.student_stages))
        self.run_student = True

    def forward(  # type: ignore[override]
        self, images: Tensor, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        """Only the loss terms leave: DDP searches the outputs for the tensors whose graph it
        walks, and an output that no loss uses (the logits under CoSS) would make it wait
        forever for the classifier's gradient."""
        out: ModelOutput | None = None
        if self.run_student:
            out = self.student(images, feats=self.student_stages or False,
                               preact=self.method.needs.student_preact)
        return self.method(out, teacher, batch)

    def predict(self, images: Tensor) -> Tensor:
        out = self.student(images)
        return self.method.eval_logits(out)

    def predict_with_norms(
        self, images: Tensor, teacher: Callable[[Tensor], ModelOutput] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``predict``'s logits and the L2 norms of the penultimate embeddings of the student
        and (given its network) the teacher, per sample: the inputs of CID Fig. 2's plot."""
        out = self.student(images)
        norms = {"student": out.embedding.float().norm(dim=1)}
        if teacher is not None:
            norms["teacher"] = teacher(images).embedding.float().norm(dim=1)
        return self.method.eval_logits(out), norms
