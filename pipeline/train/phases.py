"""Which phase each epoch of a run belongs to, and the optimiser of an initial phase.

A run trains the method's initial phases (``Method.phases``: AB's connector pre-training, FT's
paraphraser) and then the main phase of ``optim.epochs`` epochs. Epochs are counted over the
whole run (``epoch`` in checkpoints, the view ``epoch mod K``, MLflow steps), and each phase
also counts its own (``local``): the main phase's LR schedule, evaluation and the method's
``start_epoch`` see main-phase epochs only, so a method without phases runs exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.config.errors import ConfigError
from pipeline.config.schema import OptimSpec
from pipeline.distill.base import MAIN_PHASE, Method, Phase


@dataclass(frozen=True)
class EpochPhase:
    """The phase of one epoch: ``phase`` (None for the main one) and the epoch within it."""

    phase: Phase | None
    local: int

    @property
    def name(self) -> str:
        return MAIN_PHASE if self.phase is None else self.phase.name

    @property
    def is_main(self) -> bool:
        return self.phase is None


class PhasePlan:
    """The method's initial phases, in order, then ``main_epochs`` of the main phase; a phase
    without its own LR (``Phase.lr`` None) gets ``default_lr``, the run's ``optim.lr``."""

    def __init__(self, phases: tuple[Phase, ...], main_epochs: int,
                 default_lr: float | None = None) -> None:
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: expected distinct names, found {names}")
        if any(p.lr is None for p in phases) and default_lr is None:
            raise ValueError(f"phases: {names} take the run's learning rate; pass default_lr")
        self.phases = tuple(p if p.lr is not None else replace(p, lr=default_lr)
                            for p in phases)
        self.main_epochs = main_epochs
        self.initial_epochs = sum(p.epochs for p in phases)

    @property
    def total_epochs(self) -> int:
        return self.initial_epochs + self.main_epochs

    def at(self, epoch: int) -> EpochPhase:
        """The phase of run epoch ``epoch`` (0-based)."""
        start = 0
        for phase in self.phases:
            if epoch < start + phase.epochs:
                return EpochPhase(phase, epoch - start)
            start += phase.epochs
        return EpochPhase(None, epoch - start)

    def check_resume(self, epoch: int, saved_phase: str | None) -> None:
        """Refuse a checkpoint whose position belongs to another phase under this plan (the
        run's phase epochs changed since it was written): its optimiser state is that
        phase's, and loading it into another optimiser would be wrong or fail obscurely."""
        expected = self.at(epoch).name
        if saved_phase is not None and saved_phase != expected:
            raise ConfigError(
                f"checkpoint: written in phase {saved_phase!r} at run epoch {epoch + 1}, which "
                f"this run's plan ({self.describe()}) puts in phase {expected!r}; resume with "
                "the phase epochs it was written with, or start a new run directory")

    def describe(self) -> str:
        parts = [f"{p.name} {p.epochs} epoch(s) at lr {p.lr:g}" for p in self.phases]
        return ", then ".join([*parts, f"main {self.main_epochs} epoch(s)"])


def phase_optimizer(
    method: Method, phase: Phase, student: nn.Module, optim: OptimSpec
) -> torch.optim.Optimizer:
    """SGD over the phase's parameters at its constant LR, with the run's momentum, Nesterov
    flag and weight decay (RepDistiller's ``init`` stage builds the same optimiser)."""
    params = list(method.phase_parameters(phase, student))
    if not params:
        raise ValueError(f"phase {phase.name}: the method gave no parameters to optimise")
    return torch.optim.SGD(params, lr=phase.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov and optim.momentum > 0,
                           weight_decay=optim.weight_decay)
