"""The method contract: named, weighted loss terms from (student out, teacher out, batch).

A method is an ``nn.Module`` that owns its extra trainable parts (CID's linear map, IPWD's extra
head, ...). The trainer calls the teacher (or reads the cache) and hands the result in, so the same
method runs with an online or a cached teacher. Each method file cites its paper and equation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from pipeline.registry import Registry
from pipeline.types import Batch, ModelOutput, TeacherOutput


@dataclass(frozen=True)
class MethodContext:
    """Facts about the run that a method needs to build its parts."""

    num_classes: int
    student_dim: int
    teacher_dim: int | None
    epochs: int
    steps_per_epoch: int


class Method(nn.Module):
    """Base class. Subclasses set ``Options`` (a dataclass of their config keys) and implement
    ``forward`` returning a dict of already weighted loss terms, which the trainer sums."""

    Options: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    # Teacher fields this method reads ("logits", "embedding", "feats"); checked at start-up.
    teacher_fields: ClassVar[tuple[str, ...]] = ("logits",)
    # Whether the student must return stage feature maps, and pre- or post-activation.
    student_feats: ClassVar[bool] = False
    # False when the loss never reaches the student's classifier (CoSS): DDP must then be told
    # that some parameters get no gradient.
    uses_student_logits: ClassVar[bool] = True
    preact: ClassVar[bool] = False

    @classmethod
    def parse_options(cls, raw: dict[str, Any], where: str, file: str) -> Any:
        """Validate this method's config section (without ``name``) into its ``Options``.

        ``where`` is the dotted key of the section (``method``), ``file`` the config file, both
        for error messages. Composite methods override this to validate their parts.
        """
        from pipeline.config.load import to_dataclass

        return to_dataclass(cls.Options, raw, where, file)

    @classmethod
    def requirements(cls, opts: Any) -> dict[str, Any]:
        """What a run with these options needs before the method is built: ``needs_teacher``,
        ``teacher_fields``, ``student_feats``, ``preact``. Composite methods override it."""
        return {
            "needs_teacher": cls.needs_teacher,
            "teacher_fields": tuple(cls.teacher_fields),
            "student_feats": cls.student_feats,
            "preact": cls.preact,
        }

    @classmethod
    def check_run(cls, opts: Any, epochs: int) -> None:
        """Raise ``ValueError("<option>: ...")`` when ``opts`` cannot work in a run of ``epochs``
        epochs; called when the config is loaded (``--dry-run`` included). Composite methods
        check their parts."""

    def __init__(self, opts: Any, ctx: MethodContext) -> None:
        super().__init__()
        self.opts = opts
        self.ctx = ctx
        self.epoch = 0

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_logits(self, student: ModelOutput) -> Tensor:
        """Logits used for evaluation; CID overrides this with its interventional classifier."""
        return student.logits

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based)."""
        self.epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        """Called after each training epoch on every process (collectives are allowed)."""

    def sync_for_checkpoint(self) -> None:
        """Called on every process before a checkpoint; gather rank-local state (CID's partial
        centre sums) so the checkpoint holds all of it."""

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters of this method that take no weight decay (CID's W, say)."""
        return []

    def epoch_metrics(self) -> dict[str, float]:
        """Diagnostics to log once per epoch (IPWD's weight distribution, say)."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")
