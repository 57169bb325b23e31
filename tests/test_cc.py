"""CC (RepDistiller's form): against a loop, zero for equal embeddings, dependence on the row
order, both embeddings trained, requirements."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.errors import ConfigError
from pipeline.distill.base import METHODS, MethodContext
from pipeline.distill.cc import CC, CCOptions, cc_loss
from tests.feature_helpers import context, outputs


def reference_cc(e_s: torch.Tensor, e_t: torch.Tensor) -> float:
    """1/(B−1)·Σ_b Σ_d |e_s − e_t|_b,d·|e_s − e_t|_b+1,d, with loops."""
    b, d = e_s.shape
    delta = [[abs(e_s[i, k].item() - e_t[i, k].item()) for k in range(d)] for i in range(b)]
    return sum(delta[i][k] * delta[i + 1][k] for i in range(b - 1) for k in range(d)) / (b - 1)


@pytest.mark.parametrize("batch", [2, 7])
def test_cc_loss_equals_a_loop(batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    e_s = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    e_t = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cc_loss(e_s, e_t),
                               torch.tensor(reference_cc(e_s, e_t), dtype=torch.float64))


def test_zero_for_equal_embeddings_and_a_single_sample() -> None:
    e = torch.randn(6, 4, dtype=torch.float64)
    assert cc_loss(e, e.clone()) == 0
    assert cc_loss(e[:1], e[:1] + 1) == 0  # no consecutive pair
    ctx = MethodContext(5, 6, 6, epochs=1, steps_per_epoch=1)
    method = CC(CCOptions(), ctx).double()
    method.embed_t.load_state_dict(method.embed_s.state_dict())
    student, teacher, batch = outputs(context([], [], d_s=6, d_t=6), batch=4)
    teacher.embedding = student.embedding.clone()
    assert method(student, teacher, batch)["cc"] == 0


def test_loss_depends_on_the_row_order() -> None:
    g = torch.Generator().manual_seed(0)
    e_s = torch.randn(6, 4, generator=g, dtype=torch.float64)
    e_t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    perm = torch.tensor([0, 2, 4, 1, 3, 5])
    before, after = cc_loss(e_s, e_t), cc_loss(e_s[perm], e_t[perm])
    assert not torch.isclose(before, after, rtol=1e-3)
    torch.testing.assert_close(after, torch.tensor(reference_cc(e_s[perm], e_t[perm]),
                                                   dtype=torch.float64))


def test_method_embeds_both_sides_and_trains_both() -> None:
    torch.manual_seed(0)
    ctx = context([], [], d_s=6, d_t=10)
    method = CC(CCOptions(), ctx).double()
    assert method.embed_s.weight.shape == (128, 6) and method.embed_t.weight.shape == (128, 10)
    student, teacher, batch = outputs(ctx, batch=2)
    terms = method(student, teacher, batch)
    assert set(terms) == {"ce", "cc"}
    e_s = student.embedding @ method.embed_s.weight.t() + method.embed_s.bias
    e_t = teacher.embedding @ method.embed_t.weight.t() + method.embed_t.bias
    expected = 0.02 * reference_cc(e_s.detach(), e_t.detach())
    torch.testing.assert_close(terms["cc"], torch.tensor(expected, dtype=torch.float64))
    terms["cc"].backward()
    assert method.embed_s.weight.grad.abs().sum() > 0
    assert method.embed_t.weight.grad.abs().sum() > 0  # the teacher's embedding is trained too
    assert sorted(method.state_dict()) == ["embed_s.bias", "embed_s.weight", "embed_t.bias",
                                           "embed_t.weight"]


def test_requirements_and_errors() -> None:
    needs = CC.requirements(CCOptions())
    assert needs.teacher_fields == ("embedding",) and not needs.reads_stage_maps
    assert not CC.requirements(CCOptions(ce_weight=0)).uses_student_logits
    assert CC(CCOptions(feat_dim=16), context([], [])).embed_s.out_features == 16
    with pytest.raises(ValueError, match="method cc: needs the teacher's embedding size"):
        CC(CCOptions(), MethodContext(5, 6, None, epochs=1, steps_per_epoch=1))
    with pytest.raises(ConfigError, match="method.feat_dim: expected >= 1"):
        METHODS.get("cc").parse_options({"feat_dim": 0}, "method", "run.yaml")
    ctx = context([], [])
    student, teacher, batch = outputs(ctx)
    teacher.embedding = None
    with pytest.raises(ValueError, match="method cc: expected the teacher's embedding"):
        CC(CCOptions(), ctx).double()(student, teacher, batch)
    with pytest.raises(ValueError, match=r"cc: expected two \(B, d\) embeddings of one shape"):
        cc_loss(torch.zeros(3, 4), torch.zeros(3, 5))
