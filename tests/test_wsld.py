"""WSLD weights and loss against a float64 loop implementation of the authors' code."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.distill.base import MethodContext
from pipeline.distill.wsld import WSLD, WSLDOptions, wsld_loss, wsld_weights
from pipeline.types import Batch, ModelOutput, TeacherOutput

B, C = 6, 7
CTX = MethodContext(num_classes=C, student_dim=4, teacher_dim=4, epochs=1, steps_per_epoch=1)


def naive_log_softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    lse = m / T + math.log(sum(math.exp((v - m) / T) for v in row))
    return [v / T - lse for v in row]


def naive_weights(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> list[float]:
    out = []
    for b in range(zs.shape[0]):
        ce_s = -naive_log_softmax(zs[b].double().tolist())[int(y[b])]
        ce_t = -naive_log_softmax(zt[b].double().tolist())[int(y[b])]
        ratio = max(ce_s / (ce_t + 1e-7), 0.0)
        out.append(1.0 - math.exp(-ratio))
    return out


def naive_method(zs, zt, y, T: float, alpha: float, ce_weight: float) -> dict[str, float]:
    w = naive_weights(zs, zt, y)
    n = zs.shape[0]
    soft = 0.0
    ce = 0.0
    for b in range(n):
        ls = naive_log_softmax(zs[b].double().tolist(), T)
        lt = naive_log_softmax(zt[b].double().tolist(), T)
        soft_b = -sum(math.exp(lt[c]) * ls[c] for c in range(zs.shape[1]))  # cross-entropy
        soft += w[b] * soft_b
        ce += -naive_log_softmax(zs[b].double().tolist())[int(y[b])]
    return {"ce": ce_weight * ce / n, "wsl": alpha * T * T * soft / n}


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g) * 3
    zt = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return zs, zt, y


def batch(y: torch.Tensor) -> Batch:
    n = y.shape[0]
    return Batch(torch.zeros(n, 3, 2, 2), y, torch.arange(n), torch.zeros(n, dtype=torch.long))


def test_weights_match_naive() -> None:
    zs, zt, y = inputs(0)
    w = wsld_weights(zs, zt, y)
    assert w.tolist() == pytest.approx(naive_weights(zs, zt, y), rel=1e-5)
    assert ((w >= 0) & (w <= 1)).all()


@pytest.mark.parametrize(("T", "alpha", "ce_weight"), [(2.0, 2.5, 1.0), (4.0, 1.0, 0.5)])
def test_method_matches_naive(T: float, alpha: float, ce_weight: float) -> None:
    zs, zt, y = inputs(1)
    method = WSLD(WSLDOptions(T=T, alpha=alpha, ce_weight=ce_weight), CTX)
    out = method(ModelOutput(zs, torch.zeros(B, 4)), TeacherOutput(logits=zt), batch(y))
    want = naive_method(zs, zt, y, T, alpha, ce_weight)
    assert set(out) == {"ce", "wsl"}
    for key in want:
        assert out[key].item() == pytest.approx(want[key], rel=1e-5), key


def test_soft_term_is_cross_entropy_not_kl() -> None:
    # Student equal to teacher: KL would be 0, the code's soft cross-entropy is H(p_t) > 0.
    zs, _, y = inputs(2)
    assert wsld_loss(zs, zs.clone(), y, 2.0).item() > 0.1


def test_weight_is_detached() -> None:
    zs, zt, y = inputs(3)
    zs = zs.double().requires_grad_(True)
    T = 2.0
    wsld_loss(zs, zt.double(), y, T).backward()
    w = torch.tensor(naive_weights(zs.detach(), zt, y), dtype=torch.float64)
    # d/dz_s of T²·mean_b w_b·softCE_b with w constant: T·w_b·(σ(z_s/T) − σ(z_t/T))/B
    want = T * w[:, None] * (torch.softmax(zs.detach() / T, 1) - torch.softmax(zt.double() / T, 1))
    torch.testing.assert_close(zs.grad, want / B, rtol=1e-4, atol=1e-6)


def test_options_and_errors() -> None:
    opts = WSLD.parse_options({}, "method", "x")
    assert (opts.T, opts.alpha, opts.ce_weight) == (2.0, 2.5, 1.0)
    with pytest.raises(ValueError, match="T"):
        WSLDOptions(T=0.0)
    zs, _, y = inputs(0)
    method = WSLD(WSLDOptions(), CTX)
    with pytest.raises(ValueError, match="teacher logits"):
        method(ModelOutput(zs, torch.zeros(B, 4)), TeacherOutput(), batch(y))
