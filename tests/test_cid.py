"""CID terms against independent float64 loop implementations, and the CID methods' gradients,
warm-up, class centres, evaluation path and resume (specs/methods.md §1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config.errors import ConfigError
from pipeline.distill import cid_terms
from pipeline.distill.base import METHODS, MethodContext
from pipeline.distill.cid import (
    CID,
    CIDClassShape,
    CIDIntervention,
    CIDOptions,
    CIDSample,
    ClassShapeOptions,
    InterventionOptions,
    SampleOptions,
    auto_warmup_epochs,
)
from pipeline.distill.cid_terms import (
    accumulate_centres,
    class_shape_loss,
    context_coefficients,
    finalize_centres,
    interventional_logits,
    nm_mse,
    plain_mse,
    true_class_weights,
)
from pipeline.distill.losses import kd_loss
from pipeline.types import Batch, ModelOutput, TeacherOutput

C, D_S, D_T, B = 5, 4, 6, 12


def ctx(epochs: int = 4, teacher_dim: int | None = D_T) -> MethodContext:
    return MethodContext(C, D_S, teacher_dim, epochs=epochs, steps_per_epoch=3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_of(labels: list[int], seed: int = 0) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = gen(seed)
    n = len(labels)
    student = ModelOutput(torch.randn(n, C, generator=g) * 2, torch.randn(n, D_S, generator=g))
    teacher = TeacherOutput(
        logits=torch.randn(n, C, generator=g) * 2, embedding=torch.randn(n, D_T, generator=g)
    )
    y = torch.tensor(labels)
    batch = Batch(torch.zeros(n, 3, 2, 2), y, torch.arange(n), torch.zeros(n, dtype=torch.long))
    return student, teacher, batch


# Label sets: some classes several times, some once, some absent; none twice; one class only.
LABELS = {
    "mixed": [0, 2, 2, 4, 0, 2, 1, 0, 4, 2, 2, 0],  # 1 once, 3 absent
    "singletons": [4, 1, 0, 3],
    "one_class": [3, 3, 3, 3, 3],
}


# ---------------------------------------------------------------- naive float64 references


def naive_nm_mse(pred: torch.Tensor, target: torch.Tensor, normalise: bool = True) -> float:
    total = 0.0
    for b in range(pred.shape[0]):
        err = sum((float(pred[b, k]) - float(target[b, k])) ** 2 for k in range(pred.shape[1]))
        norm = sum(float(target[b, k]) ** 2 for k in range(pred.shape[1]))
        total += err / norm if normalise else err
    return total / pred.shape[0]


def naive_class_shape(h_s: torch.Tensor, h_t: torch.Tensor, labels: list[int]) -> float:
    def unit(row: list[float]) -> list[float]:
        n = math.sqrt(sum(v * v for v in row))
        return [v / n for v in row]

    losses = []
    for c in sorted(set(labels)):
        idx = [j for j, y in enumerate(labels) if y == c]
        if len(idx) < 2:
            continue
        s = [unit(h_s[j].double().tolist()) for j in idx]
        t = [unit(h_t[j].double().tolist()) for j in idx]
        total = 0.0
        for a in range(len(idx)):
            for b in range(len(idx)):
                gs = sum(x * y for x, y in zip(s[a], s[b], strict=True))
                gt = sum(x * y for x, y in zip(t[a], t[b], strict=True))
                total += (gt - gs) ** 2
        losses.append(total / len(idx) ** 2)
    return sum(losses) / len(losses) if losses else 0.0


def naive_linear(lin: nn.Linear, x: list[float]) -> list[float]:
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    return [float(b[o]) + sum(float(w[o, k]) * x[k] for k in range(len(x))) for o in range(C)]


def naive_softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def naive_item_logits(lin, h, coeffs, centres, b: int, scale: float) -> list[list[float]]:
    """z_i = g([h_b ; scale·a_bi·c̄_i]) for every context item i."""
    out = []
    for i in range(centres.shape[0]):
        ctx_vec = [scale * float(coeffs[b, i]) * float(v) for v in centres[i]]
        out.append(naive_linear(lin, h[b].double().tolist() + ctx_vec))
    return out


def naive_nwgm(lin, h, coeffs, centres, prior: bool) -> torch.Tensor:
    m = centres.shape[0]
    rows = []
    for b in range(h.shape[0]):
        ctx_vec = [0.0] * centres.shape[1]
        for i in range(m):
            for k in range(centres.shape[1]):
                ctx_vec[k] += (1 / m if prior else 1.0) * float(coeffs[b, i]) * float(centres[i, k])
        rows.append(naive_linear(lin, h[b].double().tolist() + ctx_vec))
    return torch.tensor(rows, dtype=torch.float64)


def naive_full(lin, h, coeffs, centres, prior: bool) -> torch.Tensor:
    m = centres.shape[0]
    rows = []
    for b in range(h.shape[0]):
        mix = [0.0] * C
        for z in naive_item_logits(lin, h, coeffs, centres, b, 1.0 if prior else float(m)):
            for y, p in enumerate(naive_softmax(z)):
                mix[y] += p / m  # P(c_i) = 1/m
        rows.append([math.log(p) for p in mix])
    return torch.tensor(rows, dtype=torch.float64)


def naive_online_centres(batches, T: float, d: int) -> tuple[torch.Tensor, list[float]]:
    """The authors' rule, sample by sample: c ← c·n/(n+w) + h·w/(n+w), n ← n + w."""
    centres = [[0.0] * d for _ in range(C)]
    count = [0.0] * C
    for feats, labels, teacher_logits in batches:
        for j, y in enumerate(labels.tolist()):
            w = naive_softmax([v / T for v in teacher_logits[j].double().tolist()])[y]
            n = count[y]
            centres[y] = [
                c * n / (n + w) + float(h) * w / (n + w)
                for c, h in zip(centres[y], feats[j].tolist(), strict=True)
            ]
            count[y] += w
    return torch.tensor(centres, dtype=torch.float64), count


# ---------------------------------------------------------------- pure terms


def test_nm_mse_by_hand() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # sample 1: (0 + 4) / 1 = 4; sample 2: (9 + 16) / 25 = 1; mean 2.5
    assert float(nm_mse(pred, target)) == pytest.approx(2.5, rel=1e-6)
    assert float(plain_mse(pred, target)) == pytest.approx((4 + 25) / 2, rel=1e-6)


def test_nm_mse_and_mse_match_loops_any_dtype() -> None:
    g = gen(1)
    pred, target = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g) * 3
    assert float(nm_mse(pred, target)) == pytest.approx(naive_nm_mse(pred, target), rel=1e-5)
    assert float(plain_mse(pred, target)) == pytest.approx(
        naive_nm_mse(pred, target, False), rel=1e-5
    )
    out = nm_mse(pred.half(), target.half())
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(naive_nm_mse(pred.half(), target.half()), rel=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        nm_mse(pred, target[:, :3])


@pytest.mark.parametrize("case", sorted(LABELS))
def test_class_shape_matches_loops(case: str) -> None:
    labels = LABELS[case]
    g = gen(2)
    h_s, h_t = (
        torch.randn(len(labels), D_S, generator=g),
        torch.randn(len(labels), D_T, generator=g),
    )
    want = naive_class_shape(h_s, h_t, labels)
    got = class_shape_loss(h_s, h_t, torch.tensor(labels))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, abs=1e-6, rel=1e-5)
    if case == "singletons":
        assert float(got) == 0.0
    got16 = class_shape_loss(h_s.bfloat16(), h_t.half(), torch.tensor(labels))
    assert got16.dtype == torch.float32


def test_class_shape_gradient_matches_loops() -> None:
    labels = LABELS["mixed"]
    g = gen(3)
    h_s = torch.randn(len(labels), D_S, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(len(labels), D_T, generator=g, dtype=torch.float64)
    class_shape_loss(h_s.float(), h_t, torch.tensor(labels)).backward()
    got = h_s.grad.clone()
    h_s.grad = None
    # The same loss with autograd through per-class Python loops in float64.
    losses = []
    for c in sorted(set(labels)):
        idx = torch.tensor([j for j, y in enumerate(labels) if y == c])
        if len(idx) >= 2:
            s = torch.nn.functional.normalize(h_s[idx], dim=1)
            t = torch.nn.functional.normalize(h_t[idx], dim=1)
            losses.append(((t @ t.T - s @ s.T) ** 2).mean())
    torch.stack(losses).mean().backward()
    torch.testing.assert_close(got, h_s.grad, rtol=1e-4, atol=1e-6)


def lin_and_inputs(
    seed: int, d_ctx: int = D_S
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    g = gen(seed)
    lin = nn.Linear(D_S + d_ctx, C)
    h = torch.randn(B, D_S, generator=g)
    coeffs = context_coefficients(torch.randn(B, C, generator=g) * 3, T=4.0)
    centres = torch.randn(C, d_ctx, generator=g)
    return lin, h, coeffs, centres


@pytest.mark.parametrize("prior", [False, True])
def test_interventional_logits_match_loops(prior: bool) -> None:
    lin, h, coeffs, centres = lin_and_inputs(4)
    nwgm = interventional_logits(lin, h, coeffs, centres, "nwgm", prior)
    torch.testing.assert_close(
        nwgm.double(), naive_nwgm(lin, h, coeffs, centres, prior), rtol=1e-5, atol=1e-5
    )
    full = interventional_logits(lin, h, coeffs, centres, "full", prior)
    torch.testing.assert_close(
        full.double(), naive_full(lin, h, coeffs, centres, prior), rtol=1e-5, atol=1e-5
    )
    # full returns log-probabilities: cross-entropy on them is −log P(y|do(x)).
    assert torch.allclose(full.exp().sum(1), torch.ones(B), atol=1e-5)
    y = torch.randint(0, C, (B,), generator=gen(5))
    ce = torch.nn.functional.cross_entropy(full, y)
    assert float(ce.detach()) == pytest.approx(
        float(-full.detach().gather(1, y[:, None]).mean()), rel=1e-5
    )


def test_nwgm_is_the_mean_of_the_full_rules_item_logits() -> None:
    """g_new is linear and Σ P(c_i) = 1, so the eq. 7 logits are Σ_i P(c_i)·z_i exactly."""
    lin, h, coeffs, centres = lin_and_inputs(6)
    for prior in (False, True):
        nwgm = interventional_logits(lin, h, coeffs, centres, "nwgm", prior).double()
        scale = 1.0 if prior else float(C)
        for b in range(B):
            items = torch.tensor(
                naive_item_logits(lin, h, coeffs, centres, b, scale), dtype=torch.float64
            )
            torch.testing.assert_close(nwgm[b], items.mean(0), rtol=1e-5, atol=1e-5)


def test_full_and_nwgm_with_equal_centres() -> None:
    lin, h, _, centres = lin_and_inputs(7)
    same = centres[:1].expand(C, -1).contiguous()
    uniform = torch.full((B, C), 1.0 / C)
    peaked = context_coefficients(torch.randn(B, C, generator=gen(8)) * 5, T=1.0)
    for prior in (False, True):
        nwgm_u = interventional_logits(lin, h, uniform, same, "nwgm", prior)
        full_u = interventional_logits(lin, h, uniform, same, "full", prior)
        # Equal centres and equal coefficients: every z_i is the same, the rules coincide.
        torch.testing.assert_close(full_u, torch.log_softmax(nwgm_u, 1), rtol=1e-5, atol=1e-5)
        # Equal centres: Σ a_i c̄ = c̄ whatever the coefficients, so eq. 7 ignores them ...
        nwgm_p = interventional_logits(lin, h, peaked, same, "nwgm", prior)
        torch.testing.assert_close(nwgm_p, nwgm_u)
        # ... while the mixture of eq. 6 still depends on them (a_i scales each item).
        full_p = interventional_logits(lin, h, peaked, same, "full", prior)
        assert not torch.allclose(full_p, full_u, atol=1e-4)


def test_prior_factor_scales_the_context_by_one_over_c() -> None:
    lin, h, coeffs, centres = lin_and_inputs(9)
    with_prior = interventional_logits(lin, h, coeffs, centres, "nwgm", prior_factor=True)
    scaled = interventional_logits(lin, h, coeffs, centres / C, "nwgm", prior_factor=False)
    torch.testing.assert_close(with_prior, scaled)
    assert not torch.allclose(with_prior, interventional_logits(lin, h, coeffs, centres, "nwgm"))


def test_full_rule_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    lin, h, coeffs, centres = lin_and_inputs(10)
    h.requires_grad_(True)
    one = interventional_logits(lin, h, coeffs, centres, "full")
    g_one = torch.autograd.grad(one.logsumexp(1).sum() + one[:, 0].sum(), [h, lin.weight])
    monkeypatch.setattr(cid_terms, "FULL_CHUNK_ELEMENTS", B * C * 2)  # chunks of 2 centres
    many = interventional_logits(lin, h, coeffs, centres, "full")
    g_many = torch.autograd.grad(many.logsumexp(1).sum() + many[:, 0].sum(), [h, lin.weight])
    torch.testing.assert_close(many, one)
    for a, b in zip(g_many, g_one, strict=True):
        torch.testing.assert_close(a, b)


def test_centre_accumulation_equals_online_running_mean() -> None:
    T, d = 4.0, D_S
    acc_sum, acc_weight = torch.zeros(C, d), torch.zeros(C)
    batches = []
    for k, labels in enumerate([[0, 2, 2, 0], [2, 1, 0], [0, 0, 2, 1, 2]]):  # classes 3, 4 unseen
        g = gen(20 + k)
        feats = torch.randn(len(labels), d, generator=g)
        z_t = torch.randn(len(labels), C, generator=g) * 3
        y = torch.tensor(labels)
        batches.append((feats, y, z_t))
        accumulate_centres(acc_sum, acc_weight, feats, y, true_class_weights(z_t, y, T))
    want, count = naive_online_centres(batches, T, d)
    previous = torch.full((C, d), 7.0)
    got = finalize_centres(acc_sum, acc_weight, previous)
    torch.testing.assert_close(got[:3].double(), want[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_weight.double(), torch.tensor(count, dtype=torch.float64))
    assert torch.equal(got[3:], previous[3:])  # unseen classes keep their previous centre


# ---------------------------------------------------------------- methods


def test_options_and_registration() -> None:
    for name in ("cid", "cid.sample", "cid.class_shape", "cid.intervention"):
        assert name in METHODS
    assert (auto_warmup_epochs(240), auto_warmup_epochs(100), auto_warmup_epochs(2)) == (20, 8, 1)
    assert (auto_warmup_epochs(1), auto_warmup_epochs(6), auto_warmup_epochs(18)) == (0, 1, 2)
    parsed = CID.parse_options({"alpha": 65, "context": "full"}, "method", "r.yaml")
    assert parsed.alpha == 65.0 and parsed.context == "full" and parsed.beta == 1.0
    with pytest.raises(ConfigError, match="r.yaml: method.centres"):
        CID.parse_options({"centres": "both"}, "method", "r.yaml")
    with pytest.raises(ConfigError, match="r.yaml: method.beta: expected a weight >= 0"):
        CID.parse_options({"beta": -1}, "method", "r.yaml")
    with pytest.raises(ValueError, match="leaves none of the 4 epochs"):
        CIDIntervention(InterventionOptions(warmup_epochs=4), ctx(epochs=4))
    with pytest.raises(ValueError, match="teacher's embedding size"):
        CIDSample(SampleOptions(), ctx(teacher_dim=None))


def test_sample_and_class_shape_methods() -> None:
    student, teacher, batch = batch_of(LABELS["mixed"])
    sample = CIDSample(SampleOptions(alpha=3.0), ctx())
    out = sample(student, teacher, batch)
    want = 3.0 * nm_mse(sample.W(student.embedding), teacher.embedding)
    assert set(out) == {"sample"} and torch.equal(out["sample"], want)
    assert sample.no_decay_parameters() == [sample.W.weight, sample.W.bias]
    mse = CIDSample(SampleOptions(alpha=1.0, loss="mse"), ctx())
    assert torch.equal(
        mse(student, teacher, batch)["sample"],
        plain_mse(mse.W(student.embedding), teacher.embedding),
    )
    shape = CIDClassShape(ClassShapeOptions(beta=0.5), ctx())
    got = shape(student, teacher, batch)["class_shape"]
    assert torch.equal(
        got, 0.5 * class_shape_loss(student.embedding, teacher.embedding, batch.labels)
    )
    assert shape.needs.teacher_fields == ("embedding",)
    assert sample.needs.teacher_fields == ("embedding",)


class Net(nn.Module):
    """A stand-in student: backbone (→ h_s) and original head (h_s → z_s)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(3, D_S)
        self.head = nn.Linear(D_S, C)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = torch.relu(self.backbone(x))
        return ModelOutput(self.head(h), h)


def cid_after_warmup(**kw) -> tuple[CID, Net, torch.Tensor, TeacherOutput, Batch]:
    net = Net()
    method = CID(CIDOptions(warmup_epochs=1, **kw), ctx())
    _, teacher, batch = batch_of(LABELS["mixed"], seed=30)
    x = torch.randn(B, 3, generator=gen(31))
    method.start_epoch(0)
    method(net(x), teacher, batch)  # accumulates centres in the last warm-up epoch
    method.end_epoch(0)
    method.start_epoch(1)
    return method, net, x, teacher, batch


def test_warmup_has_no_ce_and_then_the_full_loss() -> None:
    net = Net()
    method = CID(CIDOptions(warmup_epochs=2), ctx())
    _, teacher, batch = batch_of(LABELS["mixed"])
    x = torch.randn(B, 3, generator=gen(1))
    keys = []
    for epoch in range(3):
        method.start_epoch(epoch)
        keys.append(set(method(net(x), teacher, batch)))
        method.end_epoch(epoch)
    assert keys[0] == keys[1] == {"kl", "sample", "class_shape"}
    assert keys[2] == {"kl", "sample", "class_shape", "intervention_ce"}
    out = method(net(x), teacher, batch)
    assert torch.equal(out["kl"], kd_loss(net(x).logits, teacher.logits, 4.0))


def test_gradients_reach_w_g_new_backbone_and_head_only_through_kl() -> None:
    method, net, x, teacher, batch = cid_after_warmup()
    out = method(net(x), teacher, batch)
    sum(out.values()).backward()
    inter, sample = method.parts["intervention"], method.parts["sample"]
    for p in [sample.W.weight, sample.W.bias, inter.g_new.weight, net.backbone.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not inter.ctx_used.requires_grad and inter.ctx_used.grad is None
    head_full = net.head.weight.grad.clone()
    net.zero_grad()
    method(net(x), teacher, batch)["kl"].backward()
    torch.testing.assert_close(net.head.weight.grad, head_full)
    # The intervention CE reaches neither z_s (coefficients detached) nor the centres.
    student = net(x)
    ce = inter(student, teacher, batch)["intervention_ce"]
    assert torch.autograd.grad(ce, student.logits, allow_unused=True)[0] is None
    assert not context_coefficients(student.logits, 4.0).requires_grad


def test_centres_follow_the_codes_schedule_and_eval_path() -> None:
    method = CIDIntervention(InterventionOptions(warmup_epochs=2), ctx(epochs=5))
    data = [batch_of(labels, seed=40 + k) for k, labels in enumerate([[0, 1, 1, 2], [2, 0, 4]])]
    probe = data[0][0]
    for epoch in range(2):
        method.start_epoch(epoch)
        for student, teacher, batch in data:
            assert method(student, teacher, batch) == {}  # warm-up: no CE
        if epoch == 0:
            assert method.acc_weight.sum() == 0  # accumulation starts in the last warm-up epoch
        torch.testing.assert_close(method.eval_logits(probe), probe.logits)
        method.end_epoch(epoch)
    assert not method.centres_ready and method.next_ready
    want, _ = naive_online_centres(
        [(s.embedding, b.labels, t.logits) for s, t, b in data], 4.0, D_S
    )
    torch.testing.assert_close(
        method.ctx_next[[0, 1, 2, 4]].double(), want[[0, 1, 2, 4]], rtol=1e-5, atol=1e-6
    )
    assert torch.equal(method.ctx_next[3], torch.zeros(D_S)) and method.acc_weight.sum() == 0
    torch.testing.assert_close(method.eval_logits(probe), probe.logits)  # not used for training yet
    method.start_epoch(2)
    assert method.centres_ready and torch.equal(method.ctx_used, method.ctx_next)
    coeffs = context_coefficients(probe.logits, 4.0)
    want_eval = interventional_logits(method.g_new, probe.embedding, coeffs, method.ctx_used)
    torch.testing.assert_close(method.eval_logits(probe), want_eval)
    student, teacher, batch = data[0]
    assert set(method(student, teacher, batch)) == {"intervention_ce"}
    method.eval()  # no accumulation outside training
    before = method.acc_weight.clone()
    method(student, teacher, batch)
    assert torch.equal(method.acc_weight, before)


def test_teacher_centres_with_other_dims_and_full_context() -> None:
    method = CIDIntervention(
        InterventionOptions(centres="teacher", warmup_epochs=0, context="full"), ctx()
    )
    assert method.g_new.in_features == D_S + D_T and method.needs.teacher_fields == (
        "logits",
        "embedding",
    )
    student, teacher, batch = batch_of(LABELS["mixed"])
    method.start_epoch(0)
    assert torch.isfinite(method(student, teacher, batch)["intervention_ce"])
    method.end_epoch(0)
    want, _ = naive_online_centres([(teacher.embedding, batch.labels, teacher.logits)], 4.0, D_T)
    torch.testing.assert_close(method.ctx_next.double(), want, rtol=1e-5, atol=1e-6)
    method.start_epoch(1)
    assert method.eval_logits(student).shape == (B, C)


def test_ablations_and_declared_fields() -> None:
    student, teacher, batch = batch_of(LABELS["mixed"])
    no_inv = CID(CIDOptions(use_intervention=False), ctx())
    out = no_inv(student, teacher, batch)
    assert set(out) == {"kl", "sample", "class_shape", "ce"}
    assert no_inv.eval_logits(student) is student.logits
    only_inv = CID(CIDOptions(use_sample=False, use_class=False), ctx())
    assert only_inv.needs.teacher_fields == ("logits",) and only_inv.no_decay_parameters() == []
    full = CID(CIDOptions(), ctx())
    assert full.needs.teacher_fields == ("logits", "embedding")
    assert not full.needs.reads_stage_maps
    assert full._ddp_params_and_buffers_to_ignore == [
        "parts.intervention.acc_sum",
        "parts.intervention.acc_weight",
    ]
    assert full.no_decay_parameters() == list(full.parts["sample"].W.parameters())


def test_state_dict_round_trip_resumes_exactly() -> None:
    method, net, x, teacher, batch = cid_after_warmup()
    method(net(x), teacher, batch)  # a step into epoch 1: the accumulators hold partial sums
    state = {k: v.clone() for k, v in method.state_dict().items()}
    prefix = "parts.intervention."
    assert {prefix + k for k in ("ctx_used", "ctx_next", "acc_sum", "acc_weight")} <= set(state)
    assert float(state[prefix + "acc_weight"].sum()) > 0 and bool(state[prefix + "centres_ready"])
    copy = CID(CIDOptions(warmup_epochs=1), ctx())
    copy.load_state_dict(state)
    copy.start_epoch(1)  # a resumed trainer re-enters the epoch

    def go_on(model: CID) -> list[dict[str, torch.Tensor]]:
        losses = [model(net(x), teacher, batch) for _ in range(2)]
        model.end_epoch(1)
        model.start_epoch(2)
        return losses + [model(net(x), teacher, batch)]

    for a, b in zip(go_on(method), go_on(copy), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(method.parts["intervention"].ctx_used, copy.parts["intervention"].ctx_used)


def test_loading_on_another_rank_zeroes_the_accumulators(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.distill.cid as cid_module

    method, net, x, teacher, batch = cid_after_warmup()
    method(net(x), teacher, batch)
    state = method.state_dict()
    monkeypatch.setattr(cid_module, "is_distributed", lambda: True)
    monkeypatch.setattr(cid_module, "rank", lambda: 1)
    copy = CID(CIDOptions(warmup_epochs=1), ctx())
    copy.load_state_dict(state)
    inter = copy.parts["intervention"]
    assert inter.acc_weight.sum() == 0 and inter.acc_sum.abs().sum() == 0
    assert torch.equal(inter.ctx_used, state["parts.intervention.ctx_used"])


def test_terms_stay_float32_under_autocast_and_fp16_teacher() -> None:
    method, net, x, teacher, batch = cid_after_warmup(context="full")
    want = method(net(x), teacher, batch)
    half = TeacherOutput(logits=teacher.logits.half(), embedding=teacher.embedding.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = net(x)
        assert student.embedding.dtype == torch.bfloat16
        got = method(student, half, batch)
        logits = method.eval_logits(student)
    assert logits.dtype == torch.float32
    for key, value in got.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, want[key], rtol=5e-2, atol=5e-2)


def test_paper_readings_as_options() -> None:
    """Eq. 3's class sum Σ_c ‖C_c^S − C_c^T‖²_F and the bias-free W of h_sᵀW."""
    labels = LABELS["mixed"]
    g = gen(60)
    h_s, h_t = (
        torch.randn(len(labels), D_S, generator=g),
        torch.randn(len(labels), D_T, generator=g),
    )
    total = 0.0
    for c in sorted(set(labels)):
        idx = [j for j, y in enumerate(labels) if y == c]
        total += naive_class_shape(h_s[idx], h_t[idx], [c] * len(idx)) * len(idx) ** 2
    got = class_shape_loss(h_s, h_t, torch.tensor(labels), reduction="sum")
    assert float(got) == pytest.approx(total, rel=1e-5)
    method = CID(CIDOptions(sample_bias=False, class_reduction="sum"), ctx())
    assert method.parts["sample"].W.bias is None
    assert method.parts["class_shape"].opts.reduction == "sum"


def test_end_epoch_refuses_accumulators_changed_from_outside() -> None:
    method = CIDIntervention(InterventionOptions(warmup_epochs=0), ctx())
    method.start_epoch(0)
    method(*batch_of(LABELS["mixed"]))
    method.acc_weight[0] += 1.0  # what DDP's broadcast of rank 0's buffers would do
    with pytest.raises(RuntimeError, match="mark_rank_local_buffers"):
        method.end_epoch(0)


def test_requirements_follow_the_options() -> None:
    def fields(opts: CIDOptions | InterventionOptions) -> tuple[str, ...]:
        method = CID if isinstance(opts, CIDOptions) else CIDIntervention
        return method.requirements(opts).teacher_fields

    assert fields(CIDOptions()) == ("logits", "embedding")
    assert fields(CIDOptions(use_sample=False, use_class=False)) == ("logits",)
    assert fields(CIDOptions(use_sample=False, use_class=False, centres="teacher")) == (
        "logits",
        "embedding",
    )
    assert fields(InterventionOptions()) == ("logits",)
    assert fields(InterventionOptions(centres="teacher")) == ("logits", "embedding")
    assert CIDSample.requirements(SampleOptions()).teacher_fields == ("embedding",)
    assert CID.requirements(CIDOptions()).needs_teacher is True
