"""What a config may name: the registered methods and networks, handed to the config loader.

The config stage validates a run against registries it does not import (``pipeline.config`` must
load without torch and must not reach into later stages); the entry points (``launch/``,
``tools/``) and the tests load configs through ``load_run_config``, which imports the method and
model registries and injects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.config import load_config
from pipeline.config.schema import RunSpec


def load_run_config(
    path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True
) -> RunSpec:
    """``pipeline.config.load_config`` with every registered method and network."""
    from pipeline.distill import METHODS
    from pipeline.models import MODELS

    return load_config(path, overrides, methods=METHODS, models=MODELS, check_paths=check_paths)
