"""Keep freed memory in the process: CPU training steps without page faults (glibc only).

PyTorch's CPU allocator hands every tensor to ``malloc``. glibc serves a block of a few MiB (a
batch of 64 CIFAR feature maps is 4 MiB) with ``mmap`` and gives it back with ``munmap`` when it is
freed, or trims the top of the heap once 128 KiB are free there; so every step maps, faults in
(page by page) and unmaps its activations and gradients again: about 5,400 minor page faults in
every resnet8 step of 64 images. :func:`keep_freed_memory` raises the trim threshold and the top
pad to 1 GiB with ``mallopt``, so freed memory stays in the heap and the next step reuses it: about
30 faults a step, and steps 9-11 % faster on one core (``tools/bench_malloc.py``,
``benchmarks/results/malloc_cpu.json``). The mmap threshold is left to glibc, whose own rule
raises it up to 32 MiB as blocks are freed. The process keeps its peak heap instead of returning
it, which a training process reaches every step anyway.

It runs when ``pipeline`` is imported. A setting the user gave through glibc's own environment
variables (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) is left as given;
``PIPELINE_MALLOC=off`` leaves both to glibc. Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h) and the values set; the env variable that overrides each.
M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2
SETTINGS = (
    (M_TRIM_THRESHOLD, 1 << 30, "MALLOC_TRIM_THRESHOLD_"),
    (M_TOP_PAD, 1 << 30, "MALLOC_TOP_PAD_"),
)


def enabled() -> bool:
    return os.environ.get("PIPELINE_MALLOC", "on").lower() not in ("off", "0", "false")


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> dict[str, int]:
    """Set the mallopt values of ``SETTINGS`` not overridden by the environment; returns the
    ones glibc accepted, by environment-variable name (empty when disabled or not glibc)."""
    libc = _libc() if enabled() else None
    if libc is None:
        return {}
    accepted = {}
    for param, value, env in SETTINGS:
        if env in os.environ:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            accepted[env] = value
    return accepted


__all__ = ["SETTINGS", "enabled", "keep_freed_memory"]
