"""Atomic checkpoints that hold everything an exact resume needs.

One file, ``checkpoints/last.pt``, replaced atomically (write to a temporary file in the same
folder, fsync, rename), so a run killed at any moment leaves either the old or the new checkpoint.
It holds the model and method state, optimiser, grad scaler, every process's RNG states, the
position (epoch, step within the epoch, optimiser steps), best metrics and the MLflow run id.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "last.pt"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
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
