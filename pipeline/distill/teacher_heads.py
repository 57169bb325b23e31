"""Teacher-side heads trained by a teacher-phase run and loaded by the student run (SSKD, HSAKD).

The teacher phase is a run of its own (``launch/train.py`` with ``sskd.teacher`` or
``hsakd.teacher``): it trains heads on the frozen teacher and saves them, like every method's
trainable parts, in ``<run_dir>/method.pt`` under ``teacher_head.`` / ``teacher_heads.``. The
student run names that file in ``method.teacher_heads``; its MLflow run gets the tags
``teacher_heads`` (the resolved path) and ``teacher_heads_run_id`` (the MLflow run of the
teacher phase, from ``run_info.json`` beside the file), as a teacher checkpoint's run is tagged
``teacher_run_id``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config.errors import ConfigError


def load_teacher_heads(module: nn.Module, path: str, prefix: str, method: str) -> None:
    """Load ``module``'s weights from the entries ``<prefix>.*`` of the state dict at ``path``
    (a teacher-phase run's ``method.pt``); ConfigError naming the key, file and problem."""
    key = "method.teacher_heads"
    teacher_method = f"{method}.teacher"
    make = (f"train them with launch/train.py and method {teacher_method!r} (its run directory "
            "holds method.pt)")
    if not path:
        raise ConfigError(f"{key}: method {method!r} needs the teacher heads of a "
                          f"{teacher_method!r} run, found none; {make}")
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"{key}: file not found: {file}; {make}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise ConfigError(f"{key}: {file} is not a readable state dict: {err}") from err
    dot = prefix + "."
    heads = {k[len(dot):]: v for k, v in state.items() if k.startswith(dot)}
    if not heads:
        raise ConfigError(f"{key}: {file} holds no {dot}* entries (found {sorted(state)[:4]}"
                          f"...): expected the method.pt of a {teacher_method!r} run")
    own = module.state_dict()
    missing = sorted(set(own) - set(heads))
    unexpected = sorted(set(heads) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{key}: {file} does not fit this run's teacher heads: missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]} (another teacher arch?)")
    for name, tensor in own.items():
        if tuple(heads[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{key}: {file} does not fit this run's teacher heads: {dot}{name} has shape "
                f"{tuple(heads[name].shape)}, this run expects {tuple(tensor.shape)} (another "
                "teacher arch or class count?)")
    module.load_state_dict(heads)


def heads_lineage(path: str) -> dict[str, str]:
    """The MLflow tags of a run that loaded teacher heads from ``path`` (module docstring)."""
    from pipeline.teacher.online import teacher_run_id

    if not path:
        return {}
    tags = {"teacher_heads": str(Path(path).expanduser().resolve())}
    run_id = teacher_run_id(path)
    if run_id:
        tags["teacher_heads_run_id"] = run_id
    return tags


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (the method's ``train()`` keeps it there)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
