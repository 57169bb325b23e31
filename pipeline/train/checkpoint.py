"""Atomic checkpoints that hold everything an exact resume needs.

One file, ``checkpoints/last.pt``, replaced atomically (write to a temporary file in the same
folder, fsync, rename), so a run killed at any moment leaves either the old or the new checkpoint.
It holds the model and method state, optimiser, grad scaler, every process's RNG states, the
position (epoch, step within the epoch, optimiser steps), best metrics and the MLflow run id.

Everything is saved as CPU tensors (``atomic_save`` moves them), so ``student.pt`` and the
checkpoint load on a host without CUDA (``torch.load(..., weights_only=True)`` for weights). The
RNG state of a process holds its OWN device's CUDA generator (``cuda_device``), not every visible
GPU's: a run saved by processes that each saw 8 GPUs resumes where each sees one.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "last.pt"


def _cuda_device(device: torch.device | None) -> int | None:
    """The CUDA device index whose generator a process owns, or None without CUDA."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    if device is not None and device.index is not None:
        return device.index
    return torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy and torch CPU generators, plus the CUDA generator of ``device`` (default:
    the current CUDA device) when CUDA is in use."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    index = _cuda_device(device)
    if index is not None:
        state["cuda_device"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved; the CUDA generator goes to ``device`` (default: the
    current CUDA device). Checkpoints of older versions held every visible GPU's generator
    (``cuda``, a list): the entry of this device is used when it has one."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    index = _cuda_device(device)
    if index is None:
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], index)
    elif "cuda" in state and index < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][index], index)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in dicts, lists, tuples) detached and moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        moved: Any = {k: to_cpu(v) for k, v in obj.items()}
        if isinstance(obj, OrderedDict):  # a state_dict: keep its type and version metadata
            moved = OrderedDict(moved)
            if hasattr(obj, "_metadata"):
                moved._metadata = obj._metadata  # type: ignore[attr-defined]
        return moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(to_cpu(obj))`` to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(to_cpu(obj), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / CHECKPOINT_NAME


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint of a run directory, or None when it has none."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    # Our own file: it holds optimiser state and RNG tuples, so it is not weights-only.
    return torch.load(path, map_location="cpu", weights_only=False)
