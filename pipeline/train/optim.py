"""Optimiser with per-group weight decay (the papers' SGD recipes)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.schema import OptimSpec


def _is_bn_or_bias(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    student: nn.Module, method: nn.Module, spec: OptimSpec, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD over the student and the method's own parts.

    ``fused`` (the trainer sets it on CUDA): one fused kernel per step, which also takes the
    fp16 grad scaler's inf check on the device (a non-fused optimiser makes the scaler read it
    on the host, a sync every step).

    Groups: decayed parameters; parameters without decay (BN and biases of the student when
    ``no_decay_bn_bias``; whatever the method lists in ``no_decay_parameters()``, e.g. CID's W).
    """
    no_decay_ids = {id(p) for p in method.no_decay_parameters()}
    decay, no_decay = [], []
    for module, prefix in ((student, "student"), (method, "method")):
        for name, p in module.named_parameters(prefix=prefix):
            if not p.requires_grad:
                continue
            skip = id(p) in no_decay_ids or (
                spec.no_decay_bn_bias and module is student and _is_bn_or_bias(name, p)
            )
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay, "base_lr": spec.lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": spec.lr})
    return torch.optim.SGD(
        groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0,
        fused=True if fused else None,
    )
