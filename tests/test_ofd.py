"""OFD against transcriptions of the authors' code: the margin from BN (scipy's normal, element
loop), the partial L2, the connectors and stage weights; the margin of a real teacher's BNs."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from pipeline.distill.base import MethodContext
from pipeline.distill.ofd import OFD, OFDOptions, margin_from_bn, partial_l2
from pipeline.models import build_model
from pipeline.teacher.parts import BatchNormStats, TeacherParts, preact_bn_stats
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput


def _code_margin(weight, bias):
    """``get_margin_from_BN``, channel by channel with scipy."""
    out = []
    for s, m in zip(weight.tolist(), bias.tolist(), strict=True):
        s = abs(s)
        if norm.cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
                       / norm.cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


def _code_partial_l2(source, target, margin):
    """``distillation_loss`` element by element."""
    total = 0.0
    b, c, h, w = source.shape
    for n in range(b):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    s, t = float(source[n, k, i, j]), max(float(target[n, k, i, j]),
                                                          float(margin[0, k, 0, 0]))
                    if s > t or t > 0:
                        total += (s - t) ** 2
    return total


def test_margin_matches_the_code() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, generator=g) * 0.8
    bias = torch.randn(40, generator=g) * 2
    bias[:3] = torch.tensor([8.0, 12.0, -5.0])  # Φ(−m/s) ≤ 0.001: −3s
    torch.testing.assert_close(margin_from_bn(weight, bias), _code_margin(weight, bias),
                               rtol=1e-5, atol=1e-6)
    edge = margin_from_bn(torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.5]))
    assert edge.tolist() == [0.0, -0.5]  # a dead channel: the limit min(β, 0)


def test_partial_l2_matches_the_code() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    margin = -torch.rand(1, 3, 1, 1, generator=g)
    assert partial_l2(s, t, margin).item() == pytest.approx(_code_partial_l2(s, t, margin),
                                                            rel=1e-6)


def _stage(i: int, c: int, hw: int) -> StageInfo:
    return StageInfo(i, f"s{i}", c, hw, hw, 32 // hw, True)


def _ctx(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> MethodContext:
    g = torch.Generator().manual_seed(2)
    bns = {i + 1: BatchNormStats(torch.randn(c, generator=g), torch.randn(c, generator=g),
                                 torch.zeros(c), torch.ones(c), 1e-5)
           for i, (c, _) in enumerate(teacher)}
    stem = _stage(0, 4, 16)
    return MethodContext(
        num_classes=5, student_dim=8, teacher_dim=8, epochs=1, steps_per_epoch=1,
        student_stages=(stem, *[_stage(i + 1, c, hw) for i, (c, hw) in enumerate(student)]),
        teacher_stages=(stem, *[_stage(i + 1, c, hw) for i, (c, hw) in enumerate(teacher)]),
        teacher_parts=TeacherParts(preact_bn=bns))


def test_loss_is_the_codes_sum_over_stages() -> None:
    """Mismatched channels in every stage and a mismatched spatial size in the last; batch 2."""
    ctx = _ctx([(3, 8), (5, 4), (6, 4)], [(4, 8), (7, 4), (9, 2)])
    torch.manual_seed(0)
    method = OFD(OFDOptions(beta=1e-3), ctx)
    assert method.needs.preact and method.needs.teacher_fields == ()
    g = torch.Generator().manual_seed(3)
    s_maps = {i + 1: torch.randn(2, c, hw, hw, generator=g, requires_grad=True)
              for i, (c, hw) in enumerate([(3, 8), (5, 4), (6, 4)])}
    t_maps = {i + 1: torch.randn(2, c, hw, hw, generator=g)
              for i, (c, hw) in enumerate([(4, 8), (7, 4), (9, 2)])}
    y = torch.tensor([1, 3])
    student = ModelOutput(torch.randn(2, 5, generator=g), torch.zeros(2, 8), s_maps)
    batch = Batch(torch.zeros(2, 3, 2, 2), y, torch.arange(2), torch.zeros_like(y))
    terms = method(student, TeacherOutput(feats=t_maps), batch)
    ref = 0.0
    for i in range(3):
        bn = ctx.teacher_parts.preact_bn[i + 1]
        margin = _code_margin(bn.weight, bn.bias).view(1, -1, 1, 1)
        mapped = method.connectors[i](s_maps[i + 1]).detach()
        if mapped.shape[-1] != t_maps[i + 1].shape[-1]:
            mapped = torch.nn.functional.adaptive_avg_pool2d(mapped, t_maps[i + 1].shape[-2:])
        ref += _code_partial_l2(mapped, t_maps[i + 1], margin) / 2 ** (3 - i - 1)
    assert terms["ofd"].item() == pytest.approx(ref / 2 / 1000, rel=1e-5)
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(student.logits, y))
    terms["ofd"].backward()
    assert all(m.grad is not None for m in s_maps.values())
    conv = method.connectors[0][0]
    assert conv.bias is None and conv.kernel_size == (1, 1) and conv.out_channels == 4


def bns_of(teacher: torch.nn.Module) -> dict:
    return preact_bn_stats(teacher, (1, 2, 3))


def test_margins_come_from_the_teachers_bn_before_each_relu() -> None:
    torch.manual_seed(4)
    teacher = build_model("wrn_16_2", 10)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.5)
            torch.nn.init.normal_(m.bias, 0.0, 1.0)
    student = build_model("resnet20", 10)
    ctx = MethodContext(num_classes=10, student_dim=64, teacher_dim=128, epochs=1,
                        steps_per_epoch=1, student_stages=student.stage_info(32),
                        teacher_stages=teacher.stage_info(32),
                        teacher_parts=TeacherParts(preact_bn=bns_of(teacher)))
    method = OFD(OFDOptions(), ctx)
    bns = [teacher.block2.layer[0].bn1, teacher.block3.layer[0].bn1, teacher.bn1]  # the code's
    for i, bn in enumerate(bns):
        expected = _code_margin(bn.weight.detach(), bn.bias.detach()).view(1, -1, 1, 1)
        torch.testing.assert_close(getattr(method, f"margin{i}"), expected, rtol=1e-5, atol=1e-6)
    assert [c[0].in_channels for c in method.connectors] == [16, 32, 64]
    assert [c[0].out_channels for c in method.connectors] == [32, 64, 128]
    assert "margin0" not in method.state_dict()
    with pytest.raises(ValueError, match="needs the teacher's BN statistics"):
        OFD(OFDOptions(), MethodContext(**{**ctx.__dict__, "teacher_parts": None}))
    with pytest.raises(ValueError, match="stages: expected stage indices after the stem"):
        OFDOptions(stages=[0, 1])
