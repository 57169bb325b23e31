"""CPU thread setup for every entry point: fair share of the cores, also on a busy machine.

Two things made CPU training collapse (10-20× slower steps) as soon as another process ran:

- **spinning OpenMP workers.** PyTorch's CPU build uses GNU OpenMP, whose idle workers spin for
  about 300,000 iterations before they sleep. With every core running a worker, a competing
  process takes a core from one of them; each parallel region then waits at its barrier for the
  descheduled worker while the others burn the remaining cores spinning. ``OMP_WAIT_POLICY=PASSIVE``
  makes waiting workers sleep at once, so the scheduler can run the late worker on their core.
  libgomp reads it when it is loaded, so it must be in the environment before ``import torch``:
  :func:`set_openmp_defaults` runs when ``pipeline`` is imported (every entry point imports the
  package before torch) and only fills in variables the user has not set.
- **oversized pools.** Each process of a run, and each run of a study, got as many threads as the
  machine has cores, and PyTorch adds as many inter-op threads again; :func:`share_cpu_threads`
  gives each local process its share and one inter-op thread.

``PIPELINE_THREADS=off`` leaves both to the libraries' defaults (for comparisons:
``tools/bench_threads.py``).
"""

from __future__ import annotations

import os
import sys

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def enabled() -> bool:
    return os.environ.get("PIPELINE_THREADS", "on").lower() not in ("off", "0", "false")


def set_openmp_defaults() -> None:
    """Fill in the OpenMP wait policy unless the user chose one (no effect once torch is loaded)."""
    if not enabled() or "torch" in sys.modules:
        return
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def threads_per_process(local_processes: int = 1) -> int:
    """``OMP_NUM_THREADS`` when set, else the cores this process may use ÷ local processes."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(local_processes, 1))


def share_cpu_threads(local_processes: int = 1) -> int:
    """Set torch's intra-op threads to this process's share and its inter-op pool to one thread.

    Returns the number of intra-op threads (unchanged from torch's choice when disabled).
    """
    import torch

    if not enabled():
        return torch.get_num_threads()
    threads = threads_per_process(local_processes)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work has started: keep what is there
        pass
    return threads
