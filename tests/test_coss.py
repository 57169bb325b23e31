"""CoSS: L_co and L_ss against float64 loops, projection head, temperature scale, labels unused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.distill.base import MethodContext
from pipeline.distill.coss import CoSS, CoSSOptions, cosine_loss, space_similarity_loss
from pipeline.types import Batch, ModelOutput, TeacherOutput


def ctx(d_s: int, d_t: int) -> MethodContext:
    return MethodContext(num_classes=3, student_dim=d_s, teacher_dim=d_t, epochs=1,
                         steps_per_epoch=1)


def naive_cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def naive_co(s: torch.Tensor, t: torch.Tensor) -> float:
    b = s.shape[0]
    return -sum(naive_cos(s[i].double().tolist(), t[i].double().tolist()) for i in range(b)) / b


def naive_ss(s: torch.Tensor, t: torch.Tensor) -> float:
    b, d = s.shape
    total = 0.0
    for j in range(d):
        col_s = [float(s[i, j]) for i in range(b)]
        col_t = [float(t[i, j]) for i in range(b)]
        total += naive_cos(col_s, col_t)
    return -total / d


def feats(seed: int, b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # an offset per feature makes raw-column and row-normalised-column cosines differ
    return torch.randn(b, d, generator=g) + 2.0, torch.randn(b, d, generator=g) * 3 - 1.0


def batch(labels: torch.Tensor) -> Batch:
    n = labels.shape[0]
    return Batch(torch.zeros(n, 3, 2, 2), labels, torch.arange(n), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize(("b", "d"), [(6, 6), (10, 4), (3, 9)])
def test_terms_match_naive(b: int, d: int) -> None:
    s, t = feats(b * 100 + d, b, d)
    assert cosine_loss(s, t).item() == pytest.approx(naive_co(s, t), rel=1e-5)
    assert space_similarity_loss(s, t).item() == pytest.approx(naive_ss(s, t), rel=1e-5)


def test_space_term_uses_raw_features() -> None:
    s, t = feats(1, 10, 4)
    rows_s = s / s.norm(dim=1, keepdim=True)
    rows_t = t / t.norm(dim=1, keepdim=True)
    assert abs(space_similarity_loss(s, t).item() - naive_ss(rows_s, rows_t)) > 1e-3


@pytest.mark.parametrize("scale", [False, True])
def test_method_equal_dims(scale: bool) -> None:
    s, t = feats(2, 8, 5)
    opts = CoSSOptions(beta=2.0, lambda_co=0.5, lambda_ss=0.25, imagenet_temperature_scale=scale)
    method = CoSS(opts, ctx(5, 5))
    assert method.proj is None and not list(method.parameters())
    out = method(ModelOutput(torch.zeros(8, 3), s), TeacherOutput(embedding=t), batch(
        torch.zeros(8, dtype=torch.long)))
    assert set(out) == {"coss_co", "coss_ss"}
    gain = 2.0 / (0.07 * 0.1) if scale else 2.0
    assert out["coss_co"].item() == pytest.approx(gain * 0.5 * naive_co(s, t), rel=1e-5)
    assert out["coss_ss"].item() == pytest.approx(gain * 0.25 * naive_ss(s, t), rel=1e-5)


def test_projection_head_iff_dims_differ() -> None:
    method = CoSS(CoSSOptions(), ctx(4, 6))
    assert isinstance(method.proj, nn.Sequential)
    first, relu, last = method.proj
    assert isinstance(first, nn.Linear) and isinstance(relu, nn.ReLU)
    assert isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (4, 2048)
    assert (last.in_features, last.out_features) == (2048, 6)
    s, _ = feats(3, 7, 4)
    _, t = feats(4, 7, 6)
    s.requires_grad_(True)
    out = method(ModelOutput(torch.zeros(7, 3), s), TeacherOutput(embedding=t), batch(
        torch.zeros(7, dtype=torch.long)))
    with torch.no_grad():
        a_s = method.proj(s)
    assert out["coss_co"].item() == pytest.approx(naive_co(a_s, t), rel=1e-5)
    assert out["coss_ss"].item() == pytest.approx(naive_ss(a_s, t), rel=1e-5)
    (out["coss_co"] + out["coss_ss"]).backward()
    assert s.grad is not None and first.weight.grad is not None
    assert CoSS(CoSSOptions(), ctx(6, 6)).proj is None


class NoLabels(Batch):
    """A batch whose labels raise when read."""

    @property  # type: ignore[override]
    def labels(self) -> torch.Tensor:
        raise AssertionError("CoSS read batch.labels")

    @labels.setter
    def labels(self, value: torch.Tensor) -> None:
        pass


def test_labels_never_used() -> None:
    method = CoSS(CoSSOptions(), ctx(5, 5))
    s, t = feats(5, 8, 5)
    student, teacher = ModelOutput(torch.zeros(8, 3), s), TeacherOutput(embedding=t)
    a = method(student, teacher, batch(torch.zeros(8, dtype=torch.long)))
    b = method(student, teacher, batch(torch.arange(8) % 3))
    for key in a:
        assert torch.equal(a[key], b[key])
    n = 8
    c = method(student, teacher, NoLabels(torch.zeros(n, 3, 2, 2), torch.zeros(n), torch.arange(n),
                                          torch.zeros(n, dtype=torch.long)))
    for key in a:
        assert torch.equal(a[key], c[key])
    assert CoSS.needs.teacher_fields == ("embedding",) and CoSS.needs.needs_teacher
    assert not CoSS.needs.uses_student_logits


def test_errors() -> None:
    with pytest.raises(ValueError, match="teacher's embedding size"):
        CoSS(CoSSOptions(), MethodContext(3, 4, None, 1, 1))
    with pytest.raises(ValueError, match="beta"):
        CoSSOptions(beta=-1.0)
    method = CoSS(CoSSOptions(), ctx(4, 4))
    with pytest.raises(ValueError, match="teacher's embedding"):
        method(ModelOutput(torch.zeros(2, 3), torch.ones(2, 4)), TeacherOutput(), batch(
            torch.zeros(2, dtype=torch.long)))
