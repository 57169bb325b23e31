"""RKD: distance and angle terms against torchdistill 1.1.5 and an explicit loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchdistill.losses.mid_level import RKDLoss

from pipeline.distill.base import MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.rkd import RKD, RKDOptions, rkd_angle_loss, rkd_distance_loss
from pipeline.types import Batch, ModelOutput, TeacherOutput


def _td(student: torch.Tensor, teacher: torch.Tensor, dist: float, angle: float) -> torch.Tensor:
    loss = RKDLoss("s", "t", dist_factor=dist, angle_factor=angle, reduction="mean")
    return loss({"s": {"output": student}}, {"t": {"output": teacher}})


def _huber(a: float, b: float) -> float:
    x = abs(a - b)
    return 0.5 * x * x if x < 1 else x - 0.5


def _loop(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """L_D and L_A written out pair by pair and triplet by triplet (float64)."""
    s, t = student.double().flatten(1), teacher.double().flatten(1)
    n = len(s)

    def distances(e: torch.Tensor) -> list[list[float]]:
        d = [[float((e[i] - e[j]).norm()) if i != j else 0.0 for j in range(n)] for i in range(n)]
        pos = [x for row in d for x in row if x > 0]
        mu = sum(pos) / len(pos)
        return [[x / mu for x in row] for row in d]

    def cosine(e: torch.Tensor, i: int, j: int, k: int) -> float:
        u, v = e[j] - e[i], e[k] - e[i]
        if j == i or k == i:
            return 0.0
        return float(u @ v / (u.norm() * v.norm()))

    ds, dt = distances(s), distances(t)
    l_d = sum(_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    l_a = sum(_huber(cosine(s, i, j, k), cosine(t, i, j, k))
              for i, j, k in itertools.product(range(n), repeat=3)) / n**3
    return l_d, l_a


@pytest.mark.parametrize(("b", "d_s", "d_t"), [(6, 8, 8), (5, 4, 12), (2, 3, 5)])
def test_terms_equal_torchdistill_and_a_loop(b: int, d_s: int, d_t: int) -> None:
    g = torch.Generator().manual_seed(b)
    s, t = torch.randn(b, d_s, generator=g) * 2, torch.randn(b, d_t, generator=g)
    l_d, l_a = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
    torch.testing.assert_close(25 * l_d + 50 * l_a, _td(s, t, 25, 50), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_d, _td(s, t, 1, 0), rtol=1e-5, atol=1e-7)
    loop_d, loop_a = _loop(s, t)
    assert l_d.item() == pytest.approx(loop_d, rel=1e-5, abs=1e-7)
    assert l_a.item() == pytest.approx(loop_a, rel=1e-5, abs=1e-7)


def test_flattens_maps_and_a_batch_of_one_is_finite() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    flat = rkd_distance_loss(s.flatten(1), t.flatten(1))
    torch.testing.assert_close(rkd_distance_loss(s, t), flat)
    torch.testing.assert_close(25 * rkd_distance_loss(s, t) + 50 * rkd_angle_loss(s, t),
                               _td(s, t, 25, 50), rtol=1e-5, atol=1e-6)
    one = torch.randn(1, 4, generator=g)
    assert rkd_distance_loss(one, one).item() == 0.0 and rkd_angle_loss(one, one).item() == 0.0


def test_method_terms_and_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    b, c = 6, 5
    emb = torch.randn(b, 8, generator=g, requires_grad=True)
    t_emb = torch.randn(b, 16, generator=g, requires_grad=True)
    logits = torch.randn(b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    batch = Batch(torch.zeros(b, 3, 2, 2), labels, torch.arange(b), torch.zeros(b))
    method = RKD(RKDOptions(beta=2.0), MethodContext(c, 8, 16, epochs=1, steps_per_epoch=1))
    assert method.needs.teacher_fields == ("embedding",) and not method.needs.reads_stage_maps
    terms = method(ModelOutput(logits, emb), TeacherOutput(embedding=t_emb), batch)
    assert sorted(terms) == ["ce", "rkd_angle", "rkd_distance"]
    torch.testing.assert_close(terms["ce"], cross_entropy(logits, labels))
    torch.testing.assert_close(terms["rkd_distance"], 2 * 25 * rkd_distance_loss(emb, t_emb))
    torch.testing.assert_close(terms["rkd_angle"], 2 * 50 * rkd_angle_loss(emb, t_emb))
    sum(terms.values()).backward()
    assert emb.grad is not None and t_emb.grad is None  # the teacher side has no gradient
    only = RKD(RKDOptions(ce_weight=0, angle_weight=0), method.ctx)
    assert list(only(ModelOutput(logits, emb), TeacherOutput(embedding=t_emb), batch)) == [
        "rkd_distance"]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="angle_weight: expected a weight >= 0"):
        RKDOptions(angle_weight=-1)
