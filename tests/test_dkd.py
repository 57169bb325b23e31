"""DKD against an explicit float64 loop (renormalised non-target KL), a transcription of
mdistiller's masked form, and the paper's decomposition KD = TCKD + (1 − p_gt)·NCKD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.base import MethodContext
from pipeline.distill.dkd import DKD, DKDOptions, dkd_parts, warmup_factor
from pipeline.distill.losses import kd_loss_per_sample
from pipeline.types import Batch, ModelOutput, TeacherOutput

C = 7


def _inputs(b: int, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(b, C, generator=g, dtype=torch.float64) * scale
    z_t = torch.randn(b, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (b,), generator=g)
    return z_s, z_t, y


def _loop(z_s, z_t, y, T):
    """TCKD and NCKD sample by sample, class by class, with the non-target renormalised."""
    tckd = nckd = 0.0
    for b in range(len(y)):
        p_s = [math.exp(v / T) for v in z_s[b].tolist()]
        p_t = [math.exp(v / T) for v in z_t[b].tolist()]
        p_s = [v / sum(p_s) for v in p_s]
        p_t = [v / sum(p_t) for v in p_t]
        g = int(y[b])
        for a, s in ((p_t[g], p_s[g]), (1 - p_t[g], 1 - p_s[g])):
            tckd += a * math.log(a / s)
        rest_s = sum(p_s) - p_s[g]
        rest_t = sum(p_t) - p_t[g]
        for c in range(C):
            if c != g:
                q_t, q_s = p_t[c] / rest_t, p_s[c] / rest_s
                nckd += q_t * math.log(q_t / q_s)
    n = len(y)
    return tckd * T * T / n, nckd * T * T / n


def _mdistiller(z_s, z_t, y, T):
    """mdistiller ``dkd_loss``'s two parts (masks, cat_mask, log of the binary split)."""
    gt = torch.zeros_like(z_s).scatter_(1, y.unsqueeze(1), 1).bool()
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T**2 / len(y)
    nckd = F.kl_div(F.log_softmax(z_s / T - 1000.0 * gt, dim=1),
                    F.softmax(z_t / T - 1000.0 * gt, dim=1), reduction="sum") * T**2 / len(y)
    return tckd, nckd


@pytest.mark.parametrize("b,T", [(2, 4.0), (9, 1.0), (5, 2.5)])
def test_parts_equal_the_renormalised_loop(b: int, T: float) -> None:
    z_s, z_t, y = _inputs(b, seed=b)
    tckd, nckd = dkd_parts(z_s, z_t, y, T)
    ref_t, ref_n = _loop(z_s, z_t, y, T)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-5, abs=1e-7)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-5, abs=1e-7)
    md_t, md_n = _mdistiller(z_s.float(), z_t.float(), y, T)
    torch.testing.assert_close(tckd, md_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nckd, md_n, rtol=1e-5, atol=1e-6)


def test_kd_decomposes_into_tckd_and_weighted_nckd() -> None:
    """Paper eq. 7, one sample at a time: KD = TCKD + (1 − p_t,gt)·NCKD."""
    z_s, z_t, y = _inputs(6, seed=3)
    T = 4.0
    kd = kd_loss_per_sample(z_s, z_t, T)
    for b in range(6):
        tckd, nckd = dkd_parts(z_s[b:b + 1], z_t[b:b + 1], y[b:b + 1], T)
        p_gt = F.softmax(z_t[b] / T, dim=0)[y[b]].float()
        torch.testing.assert_close(tckd + (1 - p_gt) * nckd, kd[b], rtol=1e-5, atol=1e-6)


def test_confident_student_stays_finite() -> None:
    """Non-target probabilities that underflow in float32 give mdistiller's log(0); not here."""
    z_s = torch.tensor([[120.0, 0.0, 0.0]])
    z_t = torch.tensor([[1.0, 0.5, 0.0]])
    y = torch.tensor([0])
    tckd, nckd = dkd_parts(z_s, z_t, y, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert not torch.isfinite(_mdistiller(z_s, z_t, y, 1.0)[0])
    # KL(b_t ‖ b_s) with log(1 − p_s,gt) = −120 + log 2 exactly
    p_t = F.softmax(z_t.double(), dim=1)[0, 0].item()
    ref = p_t * math.log(p_t) + (1 - p_t) * (math.log(1 - p_t) + 120 - math.log(2))
    assert tckd.item() == pytest.approx(ref, rel=1e-5)


def test_warmup_counts_epochs_from_one() -> None:
    assert [warmup_factor(e, 20) for e in (0, 9, 19, 30)] == [0.05, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 1) == 1.0 and warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError, match="warmup_epochs: expected >= 0"):
        DKDOptions(warmup_epochs=-1)


def test_method_terms_weights_and_gradient() -> None:
    z_s, z_t, y = _inputs(4, seed=8)
    z_s = z_s.float().requires_grad_()
    ctx = MethodContext(num_classes=C, student_dim=3, teacher_dim=3, epochs=10, steps_per_epoch=1)
    method = DKD(DKDOptions(alpha=1.5, beta=6.0, warmup_epochs=4, ce_weight=0.5), ctx)
    method.start_epoch(1)  # second epoch: w = 2/4
    batch = Batch(torch.zeros(4, 3, 2, 2), y, torch.arange(4), torch.zeros(4, dtype=torch.long))
    terms = method(ModelOutput(z_s, torch.zeros(4, 3)), TeacherOutput(logits=z_t.float()), batch)
    tckd, nckd = dkd_parts(z_s, z_t.float(), y, 4.0)
    assert sorted(terms) == ["ce", "dkd_nckd", "dkd_tckd"]
    torch.testing.assert_close(terms["dkd_tckd"], 0.5 * 1.5 * tckd)
    torch.testing.assert_close(terms["dkd_nckd"], 0.5 * 6.0 * nckd)
    torch.testing.assert_close(terms["ce"], 0.5 * F.cross_entropy(z_s, y))
    sum(terms.values()).backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    no_ce = DKD(DKDOptions(ce_weight=0), ctx)
    assert "ce" not in no_ce(ModelOutput(z_s, torch.zeros(4, 3)),
                             TeacherOutput(logits=z_t.float()), batch)
    with pytest.raises(ValueError, match="expected teacher logits"):
        no_ce(ModelOutput(z_s, torch.zeros(4, 3)), None, batch)
