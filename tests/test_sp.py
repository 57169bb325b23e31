"""SP: against a loop-written reference, invariance to the scale of either map, torchdistill's
L1-normalised variant told apart, stage selection and requirements."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.errors import ConfigError
from pipeline.distill.base import METHODS
from pipeline.distill.sp import SP, SPOptions, sp_loss
from tests.feature_helpers import context, outputs


def reference_sp(f_s: torch.Tensor, f_t: torch.Tensor, norm_p: float = 2.0) -> float:
    """Σ_ij (G̃_t − G̃_s)²_ij / B², G = Q Qᵀ with rows normalised, written with loops."""
    def gram(f: torch.Tensor) -> list[list[float]]:
        q = [row.tolist() for row in f.flatten(1)]
        g = [[sum(a * b for a, b in zip(qi, qj, strict=True)) for qj in q] for qi in q]
        return [[v / sum(abs(x) ** norm_p for x in row) ** (1 / norm_p) for v in row] for row in g]
    g_s, g_t = gram(f_s), gram(f_t)
    b = len(g_s)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


@pytest.mark.parametrize("batch", [2, 5])
def test_sp_equals_the_loop_reference_mismatched_shapes(batch: int) -> None:
    # the last stage: student 6×2², teacher 12×4² (channels and spatial sizes both differ)
    ctx = context(student=[(4, 8), (6, 2)], teacher=[(5, 8), (12, 4)])
    student, teacher, labels = outputs(ctx, batch=batch, seed=batch)
    terms = SP(SPOptions(), ctx)(student, teacher, labels)
    assert set(terms) == {"ce", "sp"}
    expected = 3000.0 * reference_sp(student.feats[2], teacher.feats[2])
    torch.testing.assert_close(terms["sp"], torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-12)


def test_sp_is_invariant_to_the_scale_of_either_map() -> None:
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    f_t = torch.randn(4, 7, 2, 2, generator=g, dtype=torch.float64)
    base = sp_loss(f_s, f_t)
    assert base > 0
    for a, b in [(10.0, 1.0), (1.0, 0.01), (3.5, 250.0)]:
        torch.testing.assert_close(sp_loss(a * f_s, b * f_t), base, rtol=1e-10, atol=0)
    assert sp_loss(f_t, f_t) == 0


def test_torchdistill_spkd_is_the_l1_variant_not_this_loss() -> None:
    td = pytest.importorskip("torchdistill.losses.mid_level")
    g = torch.Generator().manual_seed(2)
    f_s = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    f_t = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    spkd = td.SPKDLoss("s", "t", "batchmean")({"s": {"output": f_s}}, {"t": {"output": f_t}})
    torch.testing.assert_close(spkd, torch.tensor(reference_sp(f_s, f_t, norm_p=1.0),
                                                  dtype=torch.float64))
    assert not torch.isclose(spkd, sp_loss(f_s, f_t), rtol=1e-2)


def test_stage_option_requirements_and_gradient() -> None:
    needs = SP.requirements(SPOptions())
    assert needs.teacher_stages == needs.student_stages == (-1,) and needs.teacher_fields == ()
    assert not SP.requirements(SPOptions(ce_weight=0)).uses_student_logits
    ctx = context(student=[(4, 8), (6, 4)], teacher=[(5, 8), (12, 4)])
    method = SP(SPOptions(stage=1, ce_weight=0), ctx)
    assert (method.s_info.index, method.t_info.index) == (1, 1)
    student, teacher, batch = outputs(ctx, batch=3)
    student.feats[1].requires_grad_(True)
    loss = method(student, teacher, batch)["sp"]
    torch.testing.assert_close(loss, 3000.0 * sp_loss(student.feats[1], teacher.feats[1]))
    loss.backward()
    assert student.feats[1].grad.abs().sum() > 0
    assert sp_loss(student.feats[1].half(), teacher.feats[1].half()).dtype == torch.float32
    with pytest.raises(ValueError, match="sp: expected maps of one batch"):
        sp_loss(student.feats[1], teacher.feats[1][:2])
    with pytest.raises(ConfigError, match=r"method.beta: expected a weight >= 0"):
        METHODS.get("sp").parse_options({"beta": -3}, "method", "run.yaml")
