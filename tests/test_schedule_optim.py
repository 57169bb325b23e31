"""LR schedules (pure functions of progress) and the optimiser's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config.schema import OptimSpec
from pipeline.train.optim import build_optimizer
from pipeline.train.schedule import lr_factor, set_lr


def test_multistep_matches_the_papers_recipe() -> None:
    spec = OptimSpec(lr=0.05, epochs=240, milestones=[150, 180, 210], gamma=0.1)
    assert lr_factor(spec, 0.0) == 1.0
    assert lr_factor(spec, 149.99) == 1.0
    assert lr_factor(spec, 150.0) == pytest.approx(0.1)
    assert lr_factor(spec, 185.0) == pytest.approx(0.01)
    assert lr_factor(spec, 239.0) == pytest.approx(0.001)


def test_linear_warmup_then_cosine_to_zero() -> None:
    spec = OptimSpec(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(spec, 1.0) == pytest.approx(0.5)
    assert lr_factor(spec, 2.0) == pytest.approx(1.0)
    assert lr_factor(spec, 6.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(spec, 10.0) == pytest.approx(0.0, abs=1e-12)


def test_set_lr_keeps_each_groups_base_lr() -> None:
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "base_lr": 0.1}, {"params": [q], "base_lr": 0.01}],
                          lr=0.1)
    spec = OptimSpec(lr=0.1, milestones=[1], gamma=0.5)
    set_lr(opt, spec, 1.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])


class _Method(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.w.parameters())


def test_weight_decay_groups() -> None:
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    method = _Method()
    opt = build_optimizer(student, method, OptimSpec(weight_decay=5e-4, nesterov=True))
    decay, no_decay = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(method.w.parameters()) <= ids(no_decay["params"])
    assert ids(student.parameters()) | ids(method.head.parameters()) == ids(decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    assert opt.defaults["nesterov"] is True

    opt = build_optimizer(student, method, OptimSpec(no_decay_bn_bias=True))
    decayed = ids(opt.param_groups[0]["params"])
    assert decayed == {id(student[0].weight)} | ids([method.head.weight, method.head.bias])
