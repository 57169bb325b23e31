"""Loss terms of vanilla and KD against independent float64 loop implementations."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.distill import METHODS, MethodContext
from pipeline.distill.kd import KD, KDOptions
from pipeline.distill.losses import (
    cross_entropy,
    kd_loss,
    kd_loss_per_sample,
    mse_prob_loss,
)
from pipeline.distill.vanilla import Vanilla, VanillaOptions
from pipeline.types import Batch, ModelOutput, TeacherOutput

CTX = MethodContext(num_classes=7, student_dim=4, teacher_dim=4, epochs=1, steps_per_epoch=1)


def naive_softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def naive_kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> tuple[float, list[float]]:
    """T²·KL(p_t ‖ p_s) with explicit loops in float64: (batch mean, per-sample values)."""
    per = []
    for b in range(zs.shape[0]):
        ps = naive_softmax(zs[b].double().tolist(), T)
        pt = naive_softmax(zt[b].double().tolist(), T)
        kl = 0.0
        for c in range(len(ps)):
            if pt[c] > 0:
                kl += pt[c] * (math.log(pt[c]) - math.log(ps[c]))
        per.append(kl * T * T)
    return sum(per) / len(per), per


def naive_mse(z: torch.Tensor, y: torch.Tensor, reduction: str) -> float:
    total = 0.0
    B, C = z.shape
    for b in range(B):
        p = naive_softmax(z[b].double().tolist())
        for c in range(C):
            onehot = 1.0 if int(y[b]) == c else 0.0
            total += (onehot - p[c]) ** 2
    return total / B if reduction == "sum_classes" else total / (B * C)


def logits(seed: int, B: int = 5, C: int = 7, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * scale


@pytest.mark.parametrize("T", [1.0, 4.0, 2.5])
def test_kd_loss_matches_naive(T: float) -> None:
    zs, zt = logits(0), logits(1)
    want, want_per = naive_kd(zs, zt, T)
    assert kd_loss(zs, zt, T).item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    per = kd_loss_per_sample(zs, zt, T)
    assert per.shape == (5,)
    assert per.tolist() == pytest.approx(want_per, rel=1e-5, abs=1e-7)


def test_kd_loss_hand_two_classes() -> None:
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4·ln(3/2) + 1/4·ln(1/2).
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    zs = torch.zeros(1, 2)
    assert kd_loss(zs, torch.tensor([[math.log(3.0), 0.0]]), 1.0).item() == pytest.approx(kl)
    # Same distributions at T = 2 (teacher logits doubled), times T² = 4.
    zt2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert kd_loss(zs, zt2, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    # Identical distributions give 0.
    assert kd_loss(zt2, zt2, 3.0).item() == pytest.approx(0.0, abs=1e-6)  # float32 rounding


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_gradient(T: float) -> None:
    zs, zt = logits(2).double(), logits(3).double()
    zs.requires_grad_(True)
    kd_loss(zs, zt, T).backward()
    B = zs.shape[0]
    want = T * (torch.softmax(zs.detach() / T, 1) - torch.softmax(zt / T, 1)) / B
    torch.testing.assert_close(zs.grad, want.float().double(), rtol=1e-4, atol=1e-6)


def test_kd_loss_float32_under_autocast_and_fp16_teacher() -> None:
    zs, zt = logits(4), logits(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd_loss(zs.bfloat16(), zt.half(), 4.0)
    assert out.dtype == torch.float32
    want, _ = naive_kd(zs.bfloat16().float(), zt.half().float(), 4.0)
    assert out.item() == pytest.approx(want, rel=1e-5)


def test_kd_loss_teacher_minus_inf_classes() -> None:
    # A top-k teacher cache may leave out classes as -inf: probability 0, no NaN.
    zs = logits(6).requires_grad_(True)
    zt = logits(7)
    zt[:, 3:] = -math.inf
    loss = kd_loss(zs, zt, 4.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(zs.grad).all()
    want, _ = naive_kd(zs.detach(), zt, 4.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_kd_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(logits(0), logits(1, C=6), 4.0)
    with pytest.raises(ValueError, match="T > 0"):
        kd_loss(logits(0), logits(1), 0.0)


@pytest.mark.parametrize("reduction", ["sum_classes", "mean"])
def test_mse_prob_loss_matches_naive(reduction: str) -> None:
    z = logits(8)
    y = torch.tensor([0, 6, 3, 3, 1])
    got = mse_prob_loss(z, y, reduction)  # type: ignore[arg-type]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_mse(z, y, reduction), rel=1e-5)


def test_mse_prob_loss_hand() -> None:
    # Two classes, z = (0, 0): p = (1/2, 1/2), label 0: (1 − 1/2)² + (0 − 1/2)² = 1/2.
    z = torch.zeros(1, 2)
    assert mse_prob_loss(z, torch.tensor([0])).item() == pytest.approx(0.5)
    assert mse_prob_loss(z, torch.tensor([0]), "mean").item() == pytest.approx(0.25)


@pytest.mark.parametrize("reduction", ["sum_classes", "mean"])
def test_mse_prob_loss_gradient(reduction: str) -> None:
    z0 = logits(9).double()
    y = torch.tensor([2, 2, 0, 5, 6])
    z = z0.clone().requires_grad_(True)
    mse_prob_loss(z, y, reduction).backward()  # type: ignore[arg-type]
    # Naive float64 reference built from elementwise ops only, differentiated by autograd.
    zr = z0.clone().requires_grad_(True)
    total = zr.new_zeros(())
    B, C = zr.shape
    for b in range(B):
        e = [torch.exp(zr[b, c] - zr[b].max().detach()) for c in range(C)]
        s = sum(e)
        for c in range(C):
            total = total + ((1.0 if int(y[b]) == c else 0.0) - e[c] / s) ** 2
    (total / (B if reduction == "sum_classes" else B * C)).backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)


def test_mse_prob_loss_rejects_bad_reduction() -> None:
    with pytest.raises(ValueError, match="sum_classes"):
        mse_prob_loss(logits(0), torch.zeros(5, dtype=torch.long), "sum")  # type: ignore[arg-type]


def _batch(y: torch.Tensor) -> Batch:
    n = y.shape[0]
    return Batch(torch.zeros(n, 3, 2, 2), y, torch.arange(n), torch.zeros(n, dtype=torch.long))


def _out(z: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits=z, embedding=torch.zeros(z.shape[0], 4))


def naive_ce(z: torch.Tensor, y: torch.Tensor, eps: float = 0.0) -> float:
    B, C = z.shape
    total = 0.0
    for b in range(B):
        p = naive_softmax(z[b].double().tolist())
        for c in range(C):
            target = (1 - eps) * (1.0 if int(y[b]) == c else 0.0) + eps / C
            total -= target * math.log(p[c])
    return total / B


def test_registry_holds_methods() -> None:
    assert METHODS.get("vanilla") is Vanilla
    assert METHODS.get("kd") is KD
    assert Vanilla.needs.needs_teacher is False and Vanilla.needs.teacher_fields == ()
    assert KD.needs.needs_teacher is True and KD.needs.teacher_fields == ("logits",)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_vanilla_ce(eps: float) -> None:
    z, y = logits(10), torch.tensor([1, 0, 6, 2, 2])
    method = Vanilla(VanillaOptions(label_smoothing=eps), CTX)
    terms = method(_out(z), None, _batch(y))
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(naive_ce(z, y, eps), rel=1e-5)
    assert cross_entropy(z, y, eps).item() == pytest.approx(naive_ce(z, y, eps), rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum_classes", "mean"])
def test_vanilla_mse(reduction: str) -> None:
    z, y = logits(11), torch.tensor([3, 0, 6, 2, 2])
    opts = VanillaOptions(objective="mse", mse_reduction=reduction)  # type: ignore[arg-type]
    terms = Vanilla(opts, CTX)(_out(z), None, _batch(y))
    assert set(terms) == {"mse"}
    assert terms["mse"].item() == pytest.approx(naive_mse(z, y, reduction), rel=1e-5)


def test_vanilla_options_validated() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        VanillaOptions(objective="mse", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        VanillaOptions(label_smoothing=1.0)


def test_options_parse_through_config_loader() -> None:
    opts = KD.parse_options({"T": 2, "kd_weight": 0.5}, "method", "run.yaml")
    assert opts == KDOptions(T=2.0, ce_weight=0.1, kd_weight=0.5)
    opts = Vanilla.parse_options({"objective": "mse"}, "method", "run.yaml")
    assert opts == VanillaOptions(objective="mse")
    with pytest.raises(ValueError, match="run.yaml.*method.*T"):
        KD.parse_options({"T": 0}, "method", "run.yaml")
    with pytest.raises(ValueError, match="objective"):
        Vanilla.parse_options({"objective": "l2"}, "method", "run.yaml")
    with pytest.raises(ValueError, match="temperature"):
        KD.parse_options({"temperature": 4}, "method", "run.yaml")


def test_kd_method_terms() -> None:
    zs, zt, y = logits(12), logits(13), torch.tensor([0, 1, 2, 3, 4])
    method = KD(KDOptions(), CTX)
    terms = method(_out(zs), TeacherOutput(logits=zt.half()), _batch(y))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.1 * naive_ce(zs, y), rel=1e-5)
    want_kd, _ = naive_kd(zs, zt.half().float(), 4.0)
    assert terms["kd"].item() == pytest.approx(0.9 * want_kd, rel=1e-5)

    custom = KD(KDOptions(T=1.0, ce_weight=0.5, kd_weight=0.5), CTX)
    terms = custom(_out(zs), TeacherOutput(logits=zt), _batch(y))
    assert terms["kd"].item() == pytest.approx(0.5 * naive_kd(zs, zt, 1.0)[0], rel=1e-5)


def test_kd_method_needs_teacher_logits() -> None:
    with pytest.raises(ValueError, match="teacher logits"):
        KD(KDOptions(), CTX)(_out(logits(0)), TeacherOutput(), _batch(torch.zeros(5).long()))
    with pytest.raises(ValueError, match="T: expected a temperature"):
        KDOptions(T=-1.0)
    with pytest.raises(ValueError, match="kd_weight"):
        KDOptions(kd_weight=-0.1)
