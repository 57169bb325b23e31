"""The method contract: named, weighted loss terms from (student out, teacher out, batch).

A method is an ``nn.Module`` that owns its extra trainable parts (CID's linear map, IPWD's extra
head, FitNet's regressor, ...). The trainer calls the teacher (or reads the cache) and hands the
result in, so the same method runs with an online or a cached teacher. Each method file cites
its paper and equation.

What a method reads is stated once, by ``requirements(opts)`` (a ``Requirements``; by default
the class's ``needs``), before anything is built; the instance keeps it as ``self.needs``. The
stage maps it asked for arrive in ``ModelOutput.feats`` / ``TeacherOutput.feats`` keyed by stage
index, and their shapes are in the ``MethodContext`` it is built with.

A method may declare initial phases (``phases(opts)``: AB's connector pre-training, FT's
paraphraser) that run before the main training, each for its own epochs, with its own SGD over
``phase_parameters(phase, student)`` at a constant learning rate; ``self.phase`` names the
phase being trained (``MAIN_PHASE`` otherwise) and ``forward`` returns that phase's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from pipeline.distill.requirements import Requirements
from pipeline.models.features import resolve_stages
from pipeline.registry import Registry
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput

MAIN_PHASE = "main"


@dataclass(frozen=True)
class Phase:
    """A training phase before the main one.

    ``epochs`` of SGD (the run's momentum and weight decay) at the constant learning rate
    ``lr`` over the method's ``phase_parameters``; ``lr=None`` means the run's ``optim.lr``
    (RepDistiller's AB init stage uses the main LR, and ``phases(opts)`` does not see the
    run's optimiser settings; the trainer's ``PhasePlan`` fills it in). ``uses_student``: False
    when the student network is not run at all (FT's paraphraser learns from the teacher
    alone). Nothing is evaluated during a phase; its metrics are logged under ``<name>/``.
    """

    name: str
    epochs: int
    lr: float | None = None
    uses_student: bool = True

    def __post_init__(self) -> None:
        if self.name == MAIN_PHASE or not self.name.isidentifier():
            raise ValueError(f"phase: expected a name other than {MAIN_PHASE!r}, found "
                             f"{self.name!r}")
        if self.epochs < 1 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"phase {self.name}: expected epochs >= 1 and lr > 0 (or None: "
                             f"the run's), found {self.epochs} and {self.lr}")


@dataclass(frozen=True)
class MethodContext:
    """Facts about the run that a method needs to build its parts.

    ``student_stages`` / ``teacher_stages`` describe every stage map of each network at the
    run's input size (``Net.stage_info``; empty for a run without a teacher); ``student_maps``
    and ``teacher_maps`` pick those of a selection. ``train_labels`` (int64, one per training
    sample, in index order) and ``num_train_samples`` are for methods that keep per-sample or
    per-class state (CRD's memory banks, class priors). ``teacher_parts`` holds what
    ``Requirements.teacher_modules`` asked for (``pipeline.teacher.parts.TeacherParts``: a
    frozen copy of the teacher's classifier, its BN statistics before stage ReLUs), built from
    the teacher's weights for an online and a cached teacher alike; None when nothing was asked.
    ``load_teacher`` (below) is False in a dry run.
    """

    num_classes: int
    student_dim: int
    teacher_dim: int | None
    epochs: int
    steps_per_epoch: int
    student_stages: tuple[StageInfo, ...] = ()
    teacher_stages: tuple[StageInfo, ...] = ()
    num_train_samples: int = 0
    train_labels: Any = None  # torch.Tensor (num_train_samples,) int64, or None
    image_size: int = 0
    teacher_parts: Any = None  # pipeline.teacher.parts.TeacherParts, or None
    # False in a dry run: teacher weights, and files a method loads for its teacher side (the
    # heads of a teacher-phase run: SSKD, HSAKD), are not read; those parts stay random.
    load_teacher: bool = True
    student_arch: str = ""  # model.arch / teacher.arch, for methods whose parts copy the
    teacher_arch: str = ""  # networks' structure (HSAKD's heads replicate their later stages)
    teacher_weights: str | None = None  # teacher.weights (SSKD, HSAKD: which teacher heads fit)

    def student_maps(self, selection: tuple[int | str, ...]) -> tuple[StageInfo, ...]:
        picked = resolve_stages(selection, len(self.student_stages), "student stage maps")
        return tuple(self.student_stages[i] for i in picked)

    def teacher_maps(self, selection: tuple[int | str, ...]) -> tuple[StageInfo, ...]:
        picked = resolve_stages(selection, len(self.teacher_stages), "teacher stage maps")
        return tuple(self.teacher_stages[i] for i in picked)


class Method(nn.Module):
    """Base class. Subclasses set ``Options`` (a dataclass of their config keys) and ``needs``
    (or override ``requirements``), and implement ``forward`` returning a dict of already
    weighted loss terms, which the trainer sums."""

    Options: ClassVar[type]
    needs: ClassVar[Requirements] = Requirements()

    @classmethod
    def parse_options(cls, raw: dict[str, Any], where: str, file: str) -> Any:
        """Validate this method's config section (without ``name``) into its ``Options``.

        ``where`` is the dotted key of the section (``method``), ``file`` the config file, both
        for error messages. Composite methods override this to validate their parts.
        """
        from pipeline.config.load import to_dataclass

        return to_dataclass(cls.Options, raw, where, file)

    @classmethod
    def requirements(cls, opts: Any) -> Requirements:
        """What a run with these options reads (see ``Requirements``); by default ``needs``.
        Methods whose needs depend on their options, and composite methods, override it."""
        return cls.needs

    @classmethod
    def phases(cls, opts: Any) -> tuple[Phase, ...]:
        """The phases this method trains before the main one, in order (none by default)."""
        return ()

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
        self.needs = type(self).requirements(opts)
        self.phase = MAIN_PHASE

    def set_phase(self, name: str) -> None:
        """Called by the trainer before each epoch: the phase it belongs to."""
        self.phase = name

    def phase_parameters(self, phase: Phase, student: nn.Module) -> list[nn.Parameter]:
        """The parameters the SGD of ``phase`` optimises (a method with phases defines it)."""
        raise NotImplementedError(f"{type(self).__name__} declares phase {phase.name!r} but not "
                                  "its parameters")

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_logits(self, student: ModelOutput) -> Tensor:
        """Logits used for evaluation; CID overrides this with its interventional classifier."""
        return student.logits

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch of the main phase (0-based; phases before the main
        one do not count)."""
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

    def lineage_tags(self) -> dict[str, str]:
        """MLflow tags tying this run to the runs whose outputs the method loaded (SSKD's and
        HSAKD's teacher-phase heads: the path and that run's id)."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")
