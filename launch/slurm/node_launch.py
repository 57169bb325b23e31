"""``accelerate launch`` for one node of a job, fit for pre-emption: same arguments, two additions.

    python launch/slurm/node_launch.py [accelerate launch options] launch/train.py --cfg X.yaml ...

1. SIGUSR1 sent to this launcher is forwarded to the training processes it started (its children),
   and does not kill the launcher (SIGUSR1's default action is to terminate; torch's elastic agent
   handles only SIGTERM/SIGINT/SIGHUP/SIGQUIT, and puts each worker in its own session, so a signal
   to the launcher's process group would miss them).
2. Exit status 75 (``EXIT_REQUEUE``: a training process checkpointed after a signal) reaches the
   caller: ``accelerate launch`` itself exits 1 whenever a child exits non-zero, which would hide
   the request to requeue from the sbatch script.

Under Slurm's proctrack plugins (linuxproc, cgroup) ``srun`` delivers a forwarded signal to every
process of the step, so the workers may see SIGUSR1 twice; the trainer only sets a flag, so that is
harmless. SIGTERM keeps torch's handling (forwarded to the workers, SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

EXIT_REQUEUE = 75  # pipeline.train.signals.EXIT_REQUEUE (not imported: keep start-up light)
FORWARDED = (signal.SIGUSR1,)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _forward(signum: int, frame: FrameType | None) -> None:
    targets = children(os.getpid())
    name = signal.Signals(signum).name
    print(f"node_launch: {name} → training processes {targets}", file=sys.stderr, flush=True)
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def status_of(codes: list[int]) -> int:
    """The launcher's exit status from its children's: 75 if any asked for a requeue, else 1."""
    if not codes or all(c == 0 for c in codes):
        return 0
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else 1


def main(argv: list[str] | None = None) -> int:
    # Install before the heavy imports: a SIGUSR1 during start-up must not kill the launcher.
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: accelerate's simple launcher
        return status_of([err.returncode])
    except ChildFailedError as err:  # several processes: torch's elastic agent
        codes = [failure.exitcode for failure in err.failures.values()]
        status = status_of(codes)
        print(f"node_launch: training processes exited with {codes} → {status}",
              file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
