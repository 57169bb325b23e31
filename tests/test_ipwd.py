"""IPWD weights, loss, warm-up, gradients and epoch metrics against float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.distill.base import MethodContext
from pipeline.distill.ipwd import (
    IPWD,
    IPWDOptions,
    auto_warmup_epochs,
    ipwd_log_weights,
    ipwd_raw_weights,
    normalize_and_clip,
    normalize_and_clip_log,
)
from pipeline.types import Batch, ModelOutput, TeacherOutput

B, C, D = 8, 6, 5


def ctx(epochs: int = 10) -> MethodContext:
    return MethodContext(num_classes=C, student_dim=D, teacher_dim=7, epochs=epochs,
                         steps_per_epoch=1)


def naive_log_softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    lse = m / T + math.log(sum(math.exp((v - m) / T) for v in row))
    return [v / T - lse for v in row]


def naive_standardize(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
    std = max(std, 1e-6)
    return [(v - mean) / std for v in row]


def naive_raw_weights(zkd: torch.Tensor, zcls: torch.Tensor, y: torch.Tensor, rule: str,
                      standardize: bool) -> list[float]:
    out = []
    for b in range(zkd.shape[0]):
        rk, rc = zkd[b].double().tolist(), zcls[b].double().tolist()
        if standardize:
            rk, rc = naive_standardize(rk), naive_standardize(rc)
        h_kd = -naive_log_softmax(rk)[int(y[b])]
        h_cls = -naive_log_softmax(rc)[int(y[b])]
        if rule == "propensity":
            out.append(1.0 + math.exp(h_kd - h_cls))
        else:
            out.append(1.0 + h_cls / (h_kd + 1e-7))
    return out


def naive_normalize(raw: list[float], w_max: float) -> tuple[list[float], list[bool]]:
    mean = sum(raw) / len(raw)
    normed = [v / mean for v in raw]
    return [min(max(v, 0.0), w_max) for v in normed], [v > w_max for v in normed]


def naive_kl(zs: list[float], zt: list[float], T: float) -> float:
    ls, lt = naive_log_softmax(zs, T), naive_log_softmax(zt, T)
    return T * T * sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(len(zs)))


def naive_linear(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    W, bias = layer.weight.double().tolist(), layer.bias.double().tolist()
    rows = []
    for b in range(h.shape[0]):
        x = h[b].double().tolist()
        rows.append([sum(W[c][k] * x[k] for k in range(len(x))) + bias[c] for c in range(len(W))])
    return torch.tensor(rows, dtype=torch.float64)


def inputs(seed: int, n: int = B, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, C, generator=g) * scale
    zt = torch.randn(n, C, generator=g) * scale
    h = torch.randn(n, D, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return zs, zt, h, y


def make_batch(y: torch.Tensor) -> Batch:
    n = y.shape[0]
    return Batch(torch.zeros(n, 3, 2, 2), y, torch.arange(n), torch.zeros(n, dtype=torch.long))


def naive_loss(method: IPWD, zs, zt, h, y, use_weights: bool) -> tuple[dict[str, float],
                                                                        list[float]]:
    o = method.opts
    zcls = naive_linear(method.g_cls, h)
    if use_weights:
        raw = naive_raw_weights(zs, zcls, y, o.weight_rule, o.standardize_logits)
        w, _ = naive_normalize(raw, o.w_max)
    else:
        w = [1.0] * len(y)
    n = len(y)
    ce = -sum(naive_log_softmax(zs[b].double().tolist())[int(y[b])] for b in range(n)) / n
    cls_ce = -sum(naive_log_softmax(zcls[b].tolist())[int(y[b])] for b in range(n)) / n
    kd = sum(w[b] * naive_kl(zs[b].double().tolist(), zt[b].double().tolist(), o.T)
             for b in range(n)) / n
    return {"ce": o.ce_weight * ce, "kd": o.kd_weight * kd, "cls_ce": cls_ce}, w


@pytest.mark.parametrize("rule", ["propensity", "summary"])
@pytest.mark.parametrize("standardize", [True, False])
def test_raw_weights_match_naive(rule: str, standardize: bool) -> None:
    zs, zc, _, y = inputs(0)
    got = ipwd_raw_weights(zs, zc, y, rule, standardize)  # type: ignore[arg-type]
    want = naive_raw_weights(zs, zc, y, rule, standardize)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert not got.requires_grad


def test_propensity_direction() -> None:
    # The KD head far less likely on y than the CE head: a large weight (spec §2.3).
    y = torch.tensor([0, 0])
    zkd = torch.tensor([[-3.0, 3.0], [3.0, -3.0]])
    zcls = torch.tensor([[3.0, -3.0], [3.0, -3.0]])
    w = ipwd_raw_weights(zkd, zcls, y, "propensity", standardize=False)
    assert w[0] > 100 and w[1] == pytest.approx(2.0)


def test_normalize_then_clip() -> None:
    raw = torch.tensor([1.0, 1.0, 1.0, 9.0])  # mean 3: normalised 1/3, 1/3, 1/3, 3
    w, clipped = normalize_and_clip(raw, w_max=2.0)
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2.0])
    assert clipped.tolist() == [False, False, False, True]
    w, clipped = normalize_and_clip(raw, w_max=10.0)
    assert w.mean().item() == pytest.approx(1.0) and not clipped.any()


# Very confident heads (standardize_logits: false): log-ratios H_kd − H_cls of 3 to 900, five
# of them above 60 (where the old float32 code clamped them into equal weights) and two above
# 709 (where exp overflows float64). One KD head per row is wrong by ``gap``; the CE head is
# right by 40.
CONFIDENT_GAPS = (900.0, 780.0, 130.0, 95.0, 70.0, 3.0, 0.0, 25.0)


def confident_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(CONFIDENT_GAPS)
    y = torch.arange(n) % C
    zkd, zcls = torch.zeros(n, C), torch.zeros(n, C)
    for b, gap in enumerate(CONFIDENT_GAPS):
        zkd[b, (int(y[b]) + 1) % C] = gap  # the KD head puts its mass on another class
        zcls[b, int(y[b])] = 40.0
    return zkd, zcls, y


def decimal_normalised(zkd: torch.Tensor, zcls: torch.Tensor, y: torch.Tensor,
                       w_max: float) -> list[float]:
    """The spec's formula in 60-digit decimal arithmetic: w = 1 + exp(H_kd − H_cls), w·N/Σw,
    then clip: no overflow, no log-space trick."""
    from decimal import Decimal, getcontext

    getcontext().prec = 60

    def h(row: list[float], label: int) -> Decimal:  # −log softmax(row)_label
        return (sum((Decimal(v) - Decimal(row[label])).exp() for v in row)).ln()

    raw = [1 + (h(zkd[b].tolist(), int(y[b])) - h(zcls[b].tolist(), int(y[b]))).exp()
           for b in range(len(y))]
    total = sum(raw)
    return [min(float(w * len(raw) / total), w_max) for w in raw]


@pytest.mark.parametrize("w_max", [1e300, 2.0])
def test_confident_heads_match_the_formula_in_log_space(w_max: float) -> None:
    """Log-ratios far above 60: the weights equal the formula's (one sample takes almost all of
    the mass), not equal, clipped weights for every sample above the old clamp."""
    zkd, zcls, y = confident_inputs()
    log_w = ipwd_log_weights(zkd, zcls, y, "propensity", standardize=False)
    assert log_w.dtype == torch.float64 and torch.isfinite(log_w).all()
    assert (log_w > 60).sum() == 5
    got, clipped = normalize_and_clip_log(log_w, w_max)
    want = decimal_normalised(zkd, zcls, y, w_max)
    assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-30)
    n = len(CONFIDENT_GAPS)
    assert want[0] == pytest.approx(min(n, w_max), rel=1e-6) and want[1] < 1e-40
    assert clipped.tolist() == [n > w_max] + [False] * (n - 1)


@pytest.mark.parametrize(
    ("rule", "standardize", "w_max"),
    [("propensity", True, 10.0), ("propensity", False, 2.0), ("summary", True, 1.5),
     ("summary", False, 10.0)],
)
def test_loss_matches_naive(rule: str, standardize: bool, w_max: float) -> None:
    torch.manual_seed(0)
    opts = IPWDOptions(weight_rule=rule, standardize_logits=standardize,  # type: ignore[arg-type]
                       w_max=w_max, warmup_epochs=0)
    method = IPWD(opts, ctx())
    zs, zt, h, y = inputs(1)
    method.start_epoch(0)
    out = method(ModelOutput(zs, h), TeacherOutput(logits=zt), make_batch(y))
    assert set(out) == {"ce", "kd", "cls_ce"}
    want, w = naive_loss(method, zs, zt, h, y, use_weights=True)
    for key in want:
        assert out[key].item() == pytest.approx(want[key], rel=1e-5), key
    if w_max < 10:  # these cases exercise clipping
        assert max(w) == pytest.approx(w_max)


def test_warmup_uses_unit_weights() -> None:
    torch.manual_seed(0)
    method = IPWD(IPWDOptions(warmup_epochs=2), ctx())
    zs, zt, h, y = inputs(2)
    for epoch, weighted in [(0, False), (1, False), (2, True)]:
        method.start_epoch(epoch)
        out = method(ModelOutput(zs, h), TeacherOutput(logits=zt), make_batch(y))
        want, _ = naive_loss(method, zs, zt, h, y, use_weights=weighted)
        for key in want:
            assert out[key].item() == pytest.approx(want[key], rel=1e-5), (epoch, key)


def test_auto_warmup() -> None:
    assert auto_warmup_epochs(240) == 5
    assert auto_warmup_epochs(100) == 2  # the spec suggests 1 on ImageNet: set it explicitly
    assert auto_warmup_epochs(24) == 1 and auto_warmup_epochs(23) == 0
    assert auto_warmup_epochs(1) == 0
    assert IPWD(IPWDOptions(), ctx(240)).warmup_epochs == 5
    with pytest.raises(ValueError, match="warmup_epochs"):
        IPWD(IPWDOptions(warmup_epochs=10), ctx(10))


def test_options_validation() -> None:
    with pytest.raises(ValueError, match="weight_rule"):
        IPWDOptions(weight_rule="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w_max"):
        IPWDOptions(w_max=0.5)
    opts = IPWD.parse_options({"weight_rule": "summary", "cls_head_grad": True}, "method", "x")
    assert opts.weight_rule == "summary" and opts.cls_head_grad and opts.w_max == 10.0


@pytest.mark.parametrize("cls_head_grad", [False, True])
def test_gradients(cls_head_grad: bool) -> None:
    torch.manual_seed(0)
    method = IPWD(IPWDOptions(cls_head_grad=cls_head_grad, warmup_epochs=0), ctx())
    head = nn.Linear(D, C)  # the student's own head on the backbone feature
    _, zt, h0, y = inputs(3)

    def run() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        method.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_(True)
        out = method(ModelOutput(head(h), h), TeacherOutput(logits=zt), make_batch(y))
        return out, h

    out, h = run()
    (out["ce"] + out["kd"]).backward()
    assert method.g_cls.weight.grad is None and method.g_cls.bias.grad is None
    assert h.grad is not None and head.weight.grad is not None

    out, h = run()
    out["cls_ce"].backward()
    assert method.g_cls.weight.grad is not None and method.g_cls.weight.grad.abs().sum() > 0
    assert head.weight.grad is None
    if cls_head_grad:
        assert h.grad is not None and h.grad.abs().sum() > 0
    else:
        assert h.grad is None


def test_epoch_metrics() -> None:
    torch.manual_seed(0)
    method = IPWD(IPWDOptions(w_max=2.0, warmup_epochs=0), ctx())
    method.train()
    used: list[float] = []
    clipped: list[bool] = []
    method.start_epoch(0)
    for seed in (4, 5):
        zs, zt, h, y = inputs(seed)
        method(ModelOutput(zs, h), TeacherOutput(logits=zt), make_batch(y))
        raw = naive_raw_weights(zs, naive_linear(method.g_cls, h), y, "propensity", True)
        w, c = naive_normalize(raw, 2.0)
        used += w
        clipped += c
    method.end_epoch(0)
    m = method.epoch_metrics()
    n = len(used)
    mean = sum(used) / n
    assert m["weight_mean"] == pytest.approx(mean, rel=1e-5)
    assert m["weight_std"] == pytest.approx(
        math.sqrt(sum((v - mean) ** 2 for v in used) / n), rel=1e-4)
    assert m["weight_max"] == pytest.approx(max(used), rel=1e-5)
    assert m["weight_clipped"] == pytest.approx(sum(clipped) / n)
    assert 0 < m["weight_clipped"] < 1
    # eval-mode forwards are not counted; a new epoch starts from zero
    method.eval()
    method.start_epoch(1)
    zs, zt, h, y = inputs(6)
    method(ModelOutput(zs, h), TeacherOutput(logits=zt), make_batch(y))
    method.end_epoch(1)
    assert method.epoch_metrics() == {}


def test_missing_teacher_logits() -> None:
    method = IPWD(IPWDOptions(), ctx())
    zs, _, h, y = inputs(0)
    with pytest.raises(ValueError, match="teacher logits"):
        method(ModelOutput(zs, h), TeacherOutput(), make_batch(y))
