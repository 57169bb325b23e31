"""CRD: losses, Z and memory updates against torchdistill 1.1.5's CRDLoss over several steps;
negatives and memory updates against naive loops; resume from a state dict; options."""

from __future__ import annotations

import pytest
import torch
from torchdistill.losses.mid_level import CRDLoss

from pipeline.distill.base import MethodContext
from pipeline.distill.compose import Compose, ComposeOptions, mark_rank_local_buffers
from pipeline.distill.crd import CRD, CRDOptions, l2_normalise
from pipeline.distill.crd_memory import NegativeSampler, effective_k, last_occurrences
from pipeline.distill.kd import KDOptions
from pipeline.types import Batch, ModelOutput, TeacherOutput

N, C, D_S, D_T = 300, 5, 12, 20
LABELS = torch.arange(N) % C  # 60 per class: pool of other classes 240
OPTS = dict(ce_weight=0.0, beta=1.0, feat_dim=16, nce_k=64, seed=3)


def context(labels: torch.Tensor = LABELS, d_s: int = D_S, d_t: int = D_T) -> MethodContext:
    return MethodContext(C, d_s, d_t, epochs=2, steps_per_epoch=4, num_train_samples=len(labels),
                         train_labels=labels)


def step_inputs(step: int, b: int = 8, d_s: int = D_S, d_t: int = D_T):
    g = torch.Generator().manual_seed(100 + step)
    index = torch.randperm(N, generator=g)[:b]
    student = ModelOutput(torch.randn(b, C, generator=g), torch.randn(b, d_s, generator=g))
    teacher = TeacherOutput(embedding=torch.randn(b, d_t, generator=g))
    return student, teacher, Batch(torch.zeros(b, 3, 2, 2), LABELS[index], index,
                                   torch.zeros(b, dtype=torch.long))


def reference(method: CRD) -> CRDLoss:
    td = CRDLoss("s_norm", "s_empty", "t_norm", input_size=16, output_size=N,
                 num_negative_samples=method.memory.k, num_samples=N, temperature=0.07,
                 momentum=0.5, eps=1e-7)
    td.memory_v1.copy_(method.memory.memory_s)
    td.memory_v2.copy_(method.memory.memory_t)
    return td


@pytest.mark.parametrize("negatives", ["without_replacement", "with_replacement"])
def test_matches_torchdistill_over_steps(negatives: str) -> None:
    torch.manual_seed(0)
    method = CRD(CRDOptions(**OPTS, negatives=negatives), context())
    td = reference(method)
    for step in range(4):
        student, teacher, batch = step_inputs(step)
        with torch.no_grad():
            e_s, e_t = method.embed(student, teacher)
        got = method(student, teacher, batch)["crd"]
        want = td({"s_norm": {"output": e_s},
                   "s_empty": {"input": {"pos_idx": batch.index,
                                         "contrast_idx": method.memory.last_contrast_idx}}},
                  {"t_norm": {"output": e_t}})
        torch.testing.assert_close(got, want.squeeze(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(method.memory.z, td.params[2:4], rtol=1e-6, atol=0)
        torch.testing.assert_close(method.memory.memory_s, td.memory_v1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(method.memory.memory_t, td.memory_v2, rtol=1e-6, atol=1e-6)
    assert int(method.memory.steps) == 4


def test_memory_update_against_naive_loop_with_a_repeated_sample() -> None:
    torch.manual_seed(0)
    method = CRD(CRDOptions(**OPTS), context())
    student, teacher, batch = step_inputs(0)
    batch.index[5] = batch.index[2]  # sample twice in one batch: the last occurrence wins
    old_s, old_t = method.memory.memory_s.clone(), method.memory.memory_t.clone()
    with torch.no_grad():
        e_s, e_t = method.embed(student, teacher)
    method(student, teacher, batch)
    want_s, want_t = old_s.clone(), old_t.clone()
    for b, i in enumerate(batch.index.tolist()):
        for want, old, e in ((want_s, old_s, e_s), (want_t, old_t, e_t)):
            row = 0.5 * old[i] + 0.5 * e[b]
            want[i] = row / row.norm()
    torch.testing.assert_close(method.memory.memory_s, want_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(method.memory.memory_t, want_t, rtol=1e-6, atol=1e-6)
    assert last_occurrences(torch.tensor([4, 1, 4, 2, 1])).sort().values.tolist() == [2, 3, 4]


def test_negatives_against_naive_loop() -> None:
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0])
    by_class = [i for c in range(3) for i in range(len(labels)) if labels[i] == c]
    sampler = NegativeSampler(labels, 5, "with_replacement")
    rows = torch.tensor([0, 1, 2, 2])
    r = torch.rand(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = sampler.pick(rows, r)
    for b, c in enumerate(rows.tolist()):
        pool = [i for i in by_class if labels[i] != c]  # the other classes, sorted by class
        want = [pool[int(x * len(pool))] for x in r[b].tolist()]
        assert got[b].tolist() == want
    # Without replacement: K distinct samples of other classes, every one of them reachable.
    sampler = NegativeSampler(LABELS, 64, "without_replacement")
    g = torch.Generator().manual_seed(2)
    seen = torch.zeros(N)
    for _ in range(20):
        rows = torch.arange(C)
        neg = sampler.draw(rows, g)
        assert neg.shape == (C, 64)
        for b, c in enumerate(rows.tolist()):
            assert len(set(neg[b].tolist())) == 64 and (LABELS[neg[b]] != c).all()
        seen.index_add_(0, neg.flatten(), torch.ones(neg.numel()))
    assert (seen > 0).all()  # 20·5·64 draws cover all 300 samples
    with_rep = NegativeSampler(LABELS, 12000, "with_replacement").draw(torch.zeros(2).long(), g)
    counts = torch.bincount(with_rep.flatten(), minlength=N)
    assert counts[LABELS == 0].sum() == 0
    expected = with_rep.numel() / 240  # uniform over the 240 samples of the other classes
    chi2 = ((counts[LABELS != 0] - expected) ** 2 / expected).sum()
    assert chi2 < 239 + 6 * (2 * 239) ** 0.5  # 239 degrees of freedom: mean 239, sd 22


def test_z_is_set_once_from_the_first_step() -> None:
    torch.manual_seed(0)
    method = CRD(CRDOptions(**OPTS), context())
    student, teacher, batch = step_inputs(0)
    with torch.no_grad():
        e_s, e_t = method.embed(student, teacher)
    memory_t, memory_s = method.memory.memory_t.clone(), method.memory.memory_s.clone()
    method(student, teacher, batch)
    cidx = method.memory.last_contrast_idx
    first_s = torch.exp(torch.einsum("bkd,bd->bk", memory_t[cidx], e_s) / 0.07).mean() * N
    first_t = torch.exp(torch.einsum("bkd,bd->bk", memory_s[cidx], e_t) / 0.07).mean() * N
    torch.testing.assert_close(method.memory.z, torch.stack([first_s, first_t]), rtol=1e-5, atol=0)
    z = method.memory.z.clone()
    method(*step_inputs(1))
    assert torch.equal(method.memory.z, z)


def test_resume_from_state_dict_is_exact() -> None:
    torch.manual_seed(0)
    run = CRD(CRDOptions(**OPTS), context())
    for step in range(2):
        run(*step_inputs(step))
    torch.manual_seed(1)  # another initialisation, then the checkpoint
    resumed = CRD(CRDOptions(**OPTS), context())
    resumed.load_state_dict(run.state_dict())
    assert {"memory.memory_s", "memory.memory_t", "memory.z", "memory.steps"} <= set(
        run.state_dict())
    assert "memory.sampler.labels" not in run.state_dict()  # rebuilt from the context
    for step in range(2, 4):
        a, b = run(*step_inputs(step))["crd"], resumed(*step_inputs(step))["crd"]
        assert torch.equal(a, b)
        assert torch.equal(run.memory.last_contrast_idx, resumed.memory.last_contrast_idx)
    for key, value in run.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_float32_under_autocast_and_shapes() -> None:
    torch.manual_seed(0)
    method = CRD(CRDOptions(**{**OPTS, "ce_weight": 1.0}), context(d_s=7, d_t=33))
    plain = CRD(CRDOptions(**{**OPTS, "ce_weight": 1.0}), context(d_s=7, d_t=33))
    plain.load_state_dict(method.state_dict())
    student, teacher, batch = step_inputs(0, b=2, d_s=7, d_t=33)  # batch of 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = ModelOutput(student.logits, student.embedding.bfloat16())
        got = method(half, TeacherOutput(embedding=teacher.embedding.bfloat16()), batch)
    assert got["crd"].dtype == torch.float32 and set(got) == {"crd", "ce"}
    want = plain(ModelOutput(student.logits, half.embedding.float()),
                 TeacherOutput(embedding=teacher.embedding.bfloat16().float()), batch)
    torch.testing.assert_close(got["crd"], want["crd"], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got["crd"]) and got["crd"] > 0
    got["crd"].backward()
    assert method.embed_s.weight.grad is not None and method.embed_t.weight.grad is not None


def test_k_cap_and_requirements() -> None:
    demo = torch.arange(4000) % 10
    assert effective_k(demo, 16384, 1 / 3) == 1200  # (4000 − 400) / 3
    cifar = torch.arange(50000) % 100
    assert effective_k(cifar, 16384, 1 / 3) == 16384
    with pytest.raises(ValueError, match="same class"):
        effective_k(torch.zeros(10, dtype=torch.long), 16, 1 / 3)
    assert CRD.requirements(CRDOptions()).teacher_fields == ("embedding",)
    assert not CRD.requirements(CRDOptions(ce_weight=0)).uses_student_logits
    plus_kd = ComposeOptions(terms={"kd": KDOptions(ce_weight=1, kd_weight=1),
                                    "crd": CRDOptions(**OPTS)})
    assert Compose.requirements(plus_kd).teacher_fields == ("logits", "embedding")
    composed = Compose(plus_kd, context())
    names = mark_rank_local_buffers(composed)
    assert "terms.crd.memory.memory_s" in names and "terms.crd.memory.memory_t" in names
    student, teacher, batch = step_inputs(0)
    teacher.logits = torch.randn(8, C)
    assert set(composed(student, teacher, batch)) == {"ce", "kd", "crd"}


@pytest.mark.parametrize("key, value, message", [
    ("nce_m", 1.0, "nce_m: expected a momentum"),
    ("k_cap_fraction", 0.0, "k_cap_fraction: expected a fraction"),
    ("nce_k", 0, "nce_k: expected an integer"),
    ("negatives", "some", "negatives: expected one of"),
    ("beta", -1.0, "beta: expected a weight"),
    ("nce_t", 0.0, "nce_t: expected a temperature"),
])
def test_bad_options(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CRDOptions(**{key: value})


def test_refusals() -> None:
    big = torch.arange(200_001) % 10
    with pytest.raises(ValueError, match="use with_replacement"):
        CRD(CRDOptions(), context(big))
    with pytest.raises(ValueError, match="training labels"):
        CRD(CRDOptions(), MethodContext(C, D_S, D_T, epochs=1, steps_per_epoch=1))
    method = CRD(CRDOptions(**OPTS), context())
    student, _, batch = step_inputs(0)
    with pytest.raises(ValueError, match="teacher's embedding"):
        method(student, TeacherOutput(logits=torch.randn(8, C)), batch)


def test_l2_normalise() -> None:
    x = torch.randn(4, 6)
    torch.testing.assert_close(l2_normalise(x), x / x.norm(dim=1, keepdim=True))
