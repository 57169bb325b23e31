"""Evaluate-only: score a checkpoint on any split with every metric (``launch/evaluate.py``).

A checkpoint is any network the model registry builds (``pipeline.models.build_model``: the
CIFAR nets, torchvision nets, ``timm:<name>`` where buildable) with any weights
``load_weights`` reads: a run's ``student.pt``, a teacher checkpoint in RepDistiller's layout, or
``torchvision:<ENUM>``. The scores are exactly those the trainer logs for an evaluation split
(``pipeline.evaluate.loop.evaluate_split``: top-1/5, NLL, ECE, AURC ... over the whole split,
gathered across processes), computed the same way: same eval loader and batch size, same
normalisation, memory format and autocast, and the same logits. That last point matters for
methods that predict with a head of their own (CID's interventional classifier): when
``method.pt`` lies next to a run's ``student.pt``, the run's method is rebuilt from the config,
its state loaded strictly, and the logits are ``Distiller.predict``'s, as in training; the
``network`` head (the net's own classifier) is always available instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.data import DatasetIndex, build_eval_loader, build_train_index, to_device
from pipeline.evaluate.loop import SplitOutputs, collect_split
from pipeline.evaluate.metrics import evaluate_all
from pipeline.models.base import build_model
from pipeline.models.weights import load_strict, load_weights, read_state_dict

Role = Literal["student", "teacher"]
Head = Literal["auto", "network", "method"]
METHOD_STATE = "method.pt"  # written next to student.pt by the trainer when the method has state


@dataclass
class Scorer:
    """What is scored: the module (network, or student + method), how it predicts, provenance."""

    module: nn.Module
    predict: Callable[[Tensor], Tensor]
    arch: str
    head: str  # "network" or "method"
    weights: dict[str, Any] = field(default_factory=dict)  # source, path, sha256
    # logits and {role: penultimate L2 norm per sample}, for the feature-norm plot
    predict_norms: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]] | None = None
    norm_names: tuple[str, ...] = ()  # the keys of predict_norms's dict


def arch_for(spec: RunSpec, role: Role) -> str:
    """The network of ``role`` in the config: ``model.arch`` or ``teacher.arch``."""
    if role == "student":
        return spec.model.arch
    if spec.teacher is None or not spec.teacher.arch:
        raise ConfigError("--net teacher: the config has no teacher.arch to score")
    return spec.teacher.arch


def default_weights(spec: RunSpec, role: Role, run_dir: Path) -> str:
    """``<run_dir>/student.pt`` for the student, ``teacher.weights`` for the teacher."""
    arch_for(spec, role)  # a config without that network fails first
    if role == "student":
        return str(run_dir / "student.pt")
    if spec.teacher is None or not spec.teacher.weights:
        raise ConfigError("--net teacher: the config has no teacher.weights; pass --weights")
    return spec.teacher.weights


def method_state_for(weights: str, role: Role, head: Head) -> Path | None:
    """The ``method.pt`` whose method makes the logits, or None for the network's own head."""
    path = None if weights.startswith("torchvision:") else Path(weights).expanduser()
    candidate = path.parent / METHOD_STATE if path is not None else None
    found = candidate is not None and candidate.is_file() and role == "student"
    if head == "method" and not found:
        raise ConfigError(f"--head method: expected the run's {METHOD_STATE} next to the "
                          f"student weights ({candidate}), found none")
    return candidate if found and head != "network" else None


def build_scorer(
    spec: RunSpec, role: Role, weights: str, num_classes: int, head: Head = "auto",
    eval_indices: dict[str, DatasetIndex] | None = None,
) -> Scorer:
    """The network of ``role`` with ``weights`` loaded strictly, predicting as in training."""
    arch = arch_for(spec, role)
    method_state = method_state_for(weights, role, head)
    if method_state is None:
        net = build_model(arch, num_classes)
        info = load_weights(net, weights)

        def with_norms(x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            out = net(x)
            return out.logits, {role: out.embedding.float().norm(dim=1)}

        return Scorer(net, lambda x: net(x).logits, arch, "network", info, with_norms, (role,))
    distiller = _student_with_method(spec, num_classes, eval_indices or {})
    info = load_weights(distiller.student, weights)
    load_strict(distiller.method, read_state_dict(method_state), str(method_state))
    info["method_state"] = str(method_state)
    return Scorer(distiller, distiller.predict, arch, "method", info,
                  distiller.predict_with_norms, ("student",))


def _student_with_method(spec: RunSpec, num_classes: int, evals: dict[str, DatasetIndex]) -> Any:
    """The run's student and method as the trainer builds them (random weights, online teacher
    network left unloaded: only its embedding size is read)."""
    from pipeline.train.build import RunData, build_parts
    from pipeline.train.distiller import Distiller

    spec = copy.deepcopy(spec)
    spec.model.weights = None
    if spec.teacher is not None:
        spec.teacher.source = "online"
    data = RunData(build_train_index(spec.data), evals, num_classes)
    parts = build_parts(spec, None, load_teacher=False, data=data)
    return Distiller(parts.student, parts.method)


@torch.no_grad()
def score_splits(
    spec: RunSpec, scorer: Scorer, indices: dict[str, DatasetIndex], acc: Any,
    outputs: dict[str, SplitOutputs] | None = None,
) -> dict[str, dict[str, float]]:
    """Every metric of every split in ``indices``, on ``acc``'s device and processes (an
    ``accelerate.Accelerator``: its autocast, process index and count). ``outputs``, when
    given, receives each split's logits and feature norms (for the plots)."""
    d, channels_last = spec.data, spec.train.channels_last
    module = scorer.module.to(acc.device).eval()
    if channels_last:
        module.to(memory_format=torch.channels_last)

    def prepare(batch: Any) -> Any:
        return to_device(batch, acc.device, d.mean, d.std, channels_last)

    predict: Any = scorer.predict
    extras: tuple[str, ...] = ()
    if outputs is not None and scorer.predict_norms is not None:
        predict, extras = scorer.predict_norms, scorer.norm_names
    out: dict[str, dict[str, float]] = {}
    for split, index in indices.items():
        loader = build_eval_loader(index, d, acc.process_index, acc.num_processes)
        with acc.autocast():
            kept = collect_split(predict, loader, prepare, acc.device, extras)
        out[split] = evaluate_all(kept.logits, kept.labels)
        if outputs is not None:
            outputs[split] = kept
    return out


__all__ = ["METHOD_STATE", "Scorer", "arch_for", "build_scorer", "default_weights",
           "method_state_for", "score_splits"]
