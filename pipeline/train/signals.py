"""SIGUSR1 / SIGTERM (Slurm's pre-emption warning) → checkpoint at the next step boundary.

The handler only sets a flag; at each step boundary the processes agree (a max all-reduce) on
whether any of them was signalled, so all stop at the same step and write one checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from pipeline import dist

# Exit status of a run that checkpointed after a signal; the sbatch script requeues on it.
EXIT_REQUEUE = 75


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self._local = False
        self._previous: dict[int, object] = {}

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

    @property
    def signalled(self) -> bool:
        """Whether this process was signalled (no agreement with the others: see ``check``)."""
        return self._local

    def check(self) -> bool:
        """True on every process once any process was signalled."""
        flag = self._local
        if dist.is_distributed():
            t = torch.tensor([1.0 if flag else 0.0])
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        self.requested = flag
        return flag


# One flag per process: launch/train.py installs it first thing, so a signal that arrives while
# the run is still being built is honoured at the first step boundary instead of killing it.
STOP = StopFlag()
