"""SIGUSR1 / SIGTERM (Slurm's pre-emption warning) → checkpoint at the next agreed step.

The handler only sets a flag. One process reads its own flag at every step boundary (free).
Several processes must stop at the same step, so they agree — a max all-reduce of the flags —
and that collective ends with a host read (``.item()``), which on a GPU waits for all queued
work: it is done only every ``train.stop_check_every_steps`` steps and at the last step of an
epoch, not after every step. A signal is therefore honoured at the next agreed step: every
process checkpoints there and the run exits with ``EXIT_REQUEUE`` (75).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from pipeline import dist

# Exit status of a run that checkpointed after a signal; the sbatch script requeues on it.
EXIT_REQUEUE = 75


def is_agreement_step(step: int, every: int, last: bool) -> bool:
    """Whether processes agree on the stop flag after ``step`` (1-based within the epoch)."""
    if every < 1:
        raise ValueError(f"train.stop_check_every_steps: expected >= 1, found {every}")
    return last or step % every == 0


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self._local = False
        self._previous: dict[int, object] = {}
        self._flag: torch.Tensor | None = None  # the all-reduce buffer, on the backend's device

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._local = True

    def install(self) -> None:
        if self._previous:  # already installed (launch/train.py installs it before building)
            return
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in some test runners)
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        self._local = self.requested = False
        self._flag = None

    @property
    def signalled(self) -> bool:
        """Whether this process was signalled (no agreement with the others: see ``check``)."""
        return self._local

    def check(self, step: int | None = None, every: int = 1, last: bool = False) -> bool:
        """True on every process once any process was signalled, from the first agreement step
        (see ``is_agreement_step``) after the signal. Without ``step``: agree now. One process
        needs no agreement and reads its flag at every call."""
        if not dist.is_distributed():
            self.requested = self._local
            return self.requested
        if step is not None and not is_agreement_step(step, every, last):
            return False
        self.requested = self._agree()
        return self.requested

    def _agree(self) -> bool:
        if self._flag is None:
            cuda = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
            self._flag = torch.zeros(1, device=device)
        self._flag.fill_(1.0 if self._local else 0.0)
        torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        return bool(self._flag.item() > 0)


# One flag per process: launch/train.py installs it first thing, so a signal that arrives while
# the run is still being built is honoured at the first agreed step instead of killing it.
STOP = StopFlag()
