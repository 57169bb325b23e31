"""Learning-rate schedules as pure functions of training progress.

The factor depends only on the epoch fraction reached, so a resumed run needs no scheduler state
beyond its position: multistep (the papers' recipes: ×gamma at each milestone epoch), cosine to
zero, or constant, each with an optional linear warm-up.
"""

from __future__ import annotations

import math

from pipeline.config.schema import OptimSpec


def lr_factor(spec: OptimSpec, progress: float) -> float:
    """Multiplier of the base LR after ``progress`` epochs (2.5 = halfway through epoch 3)."""
    if spec.warmup_epochs > 0 and progress < spec.warmup_epochs:
        warm = (progress + 1e-12) / spec.warmup_epochs
    else:
        warm = 1.0
    if spec.schedule == "multistep":
        passed = sum(1 for m in spec.milestones if progress >= m)
        return warm * spec.gamma**passed
    if spec.schedule == "cosine":
        span = max(spec.epochs - spec.warmup_epochs, 1e-12)
        t = min(max(progress - spec.warmup_epochs, 0.0) / span, 1.0)
        return warm * 0.5 * (1.0 + math.cos(math.pi * t))
    return warm


def set_lr(optimizer, spec: OptimSpec, progress: float) -> float:
    """Set every param group's LR (each group keeps its own ``base_lr``) and return the main one."""
    factor = lr_factor(spec, progress)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", spec.lr) * factor
    return spec.lr * factor
