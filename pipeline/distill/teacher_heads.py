"""Teacher-side heads trained by a teacher-phase run and loaded by the student run (SSKD, HSAKD).

The teacher phase is a run of its own (``launch/train.py`` with ``sskd.teacher`` or
``hsakd.teacher``): it trains heads on the frozen teacher and saves them, like every method's
trainable parts, in ``<run_dir>/method.pt`` under ``teacher_head.`` / ``teacher_heads.``. The
student run names that file in ``method.teacher_heads``; its MLflow run gets the tags
``teacher_heads`` (the resolved path) and ``teacher_heads_run_id`` (the MLflow run of the
teacher phase, from ``run_info.json`` beside the file), as a teacher checkpoint's run is tagged
``teacher_run_id``.

The teacher-phase method also saves ``teacher_digest``: the sha256 of the teacher it trained on
(its checkpoint's bytes, or the torchvision weights name), so a student run with another
teacher of the same arch (the CE- and MSE-trained twins of a pair, say) is refused instead of
reading heads that belong to another network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from pipeline.config.errors import ConfigError
from pipeline.distill.base import Method, MethodContext

DIGEST_KEY = "teacher_digest"


def teacher_digest(arch: str, weights: str | None) -> Tensor:
    """uint8 (32,): sha256 of the teacher's identity (arch and checkpoint sha256, or arch and
    torchvision weights name; not the file's path); zeros without weights."""
    from pipeline.teacher.cache_format import teacher_identity

    if not weights:
        return torch.zeros(32, dtype=torch.uint8)
    ident = teacher_identity(arch, weights)
    key = {"arch": arch, **({"weights": ident["weights"]} if weights.startswith("torchvision:")
                            else {"sha256": ident["sha256"]})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return torch.tensor(list(digest), dtype=torch.uint8)


def load_teacher_heads(module: nn.Module, path: str, prefix: str, method: str,
                       digest: Tensor | None = None) -> None:
    """Load ``module``'s weights from the entries ``<prefix>.*`` of the state dict at ``path``
    (a teacher-phase run's ``method.pt``); ConfigError naming the key, file and problem.
    ``digest``: this run's ``teacher_digest``, which the file's must equal when both are known
    (non-zero)."""
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
    saved = state.get(DIGEST_KEY)
    known = digest is not None and saved is not None and bool(digest.any()) and bool(saved.any())
    if known and not torch.equal(saved.cpu(), digest.cpu()):
        raise ConfigError(f"{key}: {file} holds heads trained on another teacher (its "
                          "checkpoint's sha256 differs from teacher.weights of this run); use "
                          f"the {teacher_method!r} run of this teacher")
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


class FrozenHeadsMethod(Method):
    """A student-phase method whose attribute ``frozen_heads`` holds the teacher-phase heads:
    :meth:`load_frozen` loads them (from ``method.teacher_heads``, checked against this run's
    teacher) and freezes them, ``train()`` keeps them in eval mode, and the run is tagged with
    where they came from."""

    frozen_heads: ClassVar[str]  # the attribute that holds the frozen heads

    def load_frozen(self, heads: nn.Module, ctx: MethodContext, prefix: str,
                    method: str) -> nn.Module:
        if ctx.load_teacher:
            load_teacher_heads(heads, self.opts.teacher_heads, prefix, method,
                               teacher_digest(ctx.teacher_arch, ctx.teacher_weights))
        return freeze(heads)

    def train(self, mode: bool = True) -> FrozenHeadsMethod:
        super().train(mode)
        getattr(self, self.frozen_heads).eval()
        return self

    def lineage_tags(self) -> dict[str, str]:
        return heads_lineage(self.opts.teacher_heads)
