"""NST: the batched-matmul MMD² against RepDistiller's broadcast form, transcribed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.base import MethodContext
from pipeline.distill.nst import NST, NSTOptions, nst_loss
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput


def _broadcast(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller ``NSTLoss.nst_loss``: pool, normalise, kernel by broadcasting (float64)."""
    f_s, f_t = f_s.double(), f_t.double()
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return poly(f_t, f_t).mean() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()


@pytest.mark.parametrize(("s_shape", "t_shape"), [
    ((4, 6, 8, 8), (4, 6, 8, 8)),     # same shape
    ((3, 5, 8, 8), (3, 12, 8, 8)),    # mismatched channels
    ((3, 4, 8, 8), (3, 7, 4, 4)),     # student larger: pooled to 4×4
    ((2, 6, 2, 2), (2, 3, 4, 4)),     # teacher larger, batch of 2
])
def test_equals_the_broadcast_form(s_shape: tuple, t_shape: tuple) -> None:
    g = torch.Generator().manual_seed(sum(s_shape))
    s, t = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g).relu()
    value = nst_loss(s, t)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_broadcast(s, t).item(), rel=1e-5, abs=1e-7)


def test_gradient_reaches_the_student_only() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)
    nst_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    assert nst_loss(t.detach(), t.detach()).abs().item() < 1e-6  # MMD² of a map with itself


def _stages(*shapes: tuple[int, int]) -> tuple[StageInfo, ...]:
    return tuple(StageInfo(i, f"s{i}", c, h, h, 32 // h, True) for i, (c, h) in enumerate(shapes))


def test_method_pairs_every_stage_after_the_stem() -> None:
    ctx = MethodContext(3, 8, 8, epochs=1, steps_per_epoch=1,
                        student_stages=_stages((4, 8), (4, 8), (6, 4), (8, 2)),
                        teacher_stages=_stages((4, 8), (8, 8), (12, 4), (16, 2)))
    method = NST(NSTOptions(), ctx)
    assert method.needs.student_stages == method.needs.teacher_stages == ("all",)
    assert not method.needs.preact and method.needs.teacher_fields == ()
    g = torch.Generator().manual_seed(5)
    s = {i: torch.randn(2, c, h, h, generator=g) for i, (c, h) in enumerate(
        [(4, 8), (4, 8), (6, 4), (8, 2)]) if i > 0}
    t = {i: torch.randn(2, c, h, h, generator=g) for i, (c, h) in enumerate(
        [(4, 8), (8, 8), (12, 4), (16, 2)]) if i > 0}
    logits, labels = torch.randn(2, 3, generator=g), torch.tensor([0, 2])
    batch = Batch(torch.zeros(2, 3, 2, 2), labels, torch.arange(2), torch.zeros(2))
    terms = method(ModelOutput(logits, torch.zeros(2, 8), s), TeacherOutput(feats=t), batch)
    assert sorted(terms) == ["ce", "nst"]
    expected = 50 * sum(_broadcast(s[i], t[i]) for i in (1, 2, 3))
    assert terms["nst"].item() == pytest.approx(expected.item(), rel=1e-5)
    fewer = MethodContext(3, 8, 8, epochs=1, steps_per_epoch=1,
                          student_stages=ctx.student_stages, teacher_stages=ctx.teacher_stages[:3])
    with pytest.raises(ValueError, match="select 3 student maps .* but 2 teacher maps"):
        NST(NSTOptions(), fewer)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="stages: expected stage indices .* or 'all'"):
        NSTOptions(stages=("last",))
    with pytest.raises(ValueError, match="beta: expected a weight >= 0"):
        NSTOptions(beta=-1)
