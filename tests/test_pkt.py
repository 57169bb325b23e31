"""PKT against torchdistill 1.1.5 and an explicit loop."""

from __future__ import annotations

import math

import pytest
import torch
from torchdistill.losses.mid_level import PKTLoss

from pipeline.distill.base import MethodContext
from pipeline.distill.pkt import PKT, PKTOptions, pkt_loss
from pipeline.types import Batch, ModelOutput, TeacherOutput


def _td(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    loss = PKTLoss("s", "output", "t", "output", eps=1e-7)
    return loss({"s": {"output": student.clone()}}, {"t": {"output": teacher.clone()}})


def _loop(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    s, t = student.double().flatten(1), teacher.double().flatten(1)
    n = len(s)

    def probs(x: torch.Tensor) -> list[list[float]]:
        unit = [x[i] / (float(x[i].norm()) + eps) for i in range(n)]
        k = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize(("b", "d_s", "d_t"), [(7, 8, 8), (5, 4, 12), (2, 3, 5)])
def test_equals_torchdistill_and_a_loop(b: int, d_s: int, d_t: int) -> None:
    g = torch.Generator().manual_seed(b)
    s, t = torch.randn(b, d_s, generator=g), torch.randn(b, d_t, generator=g).relu()
    value = pkt_loss(s, t)
    torch.testing.assert_close(value, _td(s, t), rtol=1e-5, atol=1e-9)
    assert value.item() == pytest.approx(_loop(s, t), rel=1e-5, abs=1e-9)


def test_zero_rows_and_maps() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 6, generator=g)
    s[1] = 0  # an all-zero embedding (a dead ReLU) has cosine 0 with everything
    torch.testing.assert_close(pkt_loss(s, t), _td(s.flatten(1), t), rtol=1e-5, atol=1e-9)
    assert torch.isfinite(pkt_loss(s, t))


def test_method_terms_and_gradients() -> None:
    g = torch.Generator().manual_seed(4)
    b = 6
    emb = torch.randn(b, 8, generator=g, requires_grad=True)
    t_emb = torch.randn(b, 10, generator=g, requires_grad=True)
    logits, labels = torch.randn(b, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    batch = Batch(torch.zeros(b, 3, 2, 2), labels, torch.arange(b), torch.zeros(b))
    method = PKT(PKTOptions(), MethodContext(3, 8, 10, epochs=1, steps_per_epoch=1))
    terms = method(ModelOutput(logits, emb), TeacherOutput(embedding=t_emb), batch)
    assert sorted(terms) == ["ce", "pkt"]
    torch.testing.assert_close(terms["pkt"], 30000 * pkt_loss(emb, t_emb))
    terms["pkt"].backward()
    assert emb.grad is not None and t_emb.grad is None
    no_ce = PKT(PKTOptions(ce_weight=0), method.ctx)
    assert list(no_ce(ModelOutput(logits, emb), TeacherOutput(embedding=t_emb), batch)) == ["pkt"]
