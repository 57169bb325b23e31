"""AT: both forms against torchdistill's ATLoss (code and paper modes), pooling against block
averages written out, other exponents against a loop, stage selection and requirements."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.errors import ConfigError
from pipeline.distill.at import AT, ATOptions, at_stage_loss, attention_map
from pipeline.distill.base import METHODS
from tests.feature_helpers import context, outputs

td_losses = pytest.importorskip("torchdistill.losses.mid_level")

# Mismatched channels at every stage, equal spatial sizes (torchdistill does not pool).
STUDENT = [(4, 16), (6, 8), (8, 4)]
TEACHER = [(5, 16), (9, 8), (12, 4)]


def _td_at(student: dict, teacher: dict, stages: list[int], mode: str) -> torch.Tensor:
    pairs = {f"p{k}": {"student": {"io": "output", "path": f"s{k}"},
                       "teacher": {"io": "output", "path": f"t{k}"}, "weight": 1}
             for k in stages}
    loss = td_losses.ATLoss(pairs, mode=mode)
    s_io = {f"s{k}": {"output": student[k]} for k in stages}
    t_io = {f"t{k}": {"output": teacher[k]} for k in stages}
    return loss(s_io, t_io)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_equals_torchdistill(mode: str) -> None:
    ctx = context(STUDENT, TEACHER)
    method = AT(ATOptions(beta=1000.0, mode=mode), ctx)
    student, teacher, batch = outputs(ctx, batch=2)
    terms = method(student, teacher, batch)
    assert set(terms) == {"ce", "at"}
    expected = 1000.0 * _td_at(student.feats, teacher.feats, [1, 2, 3], mode)
    torch.testing.assert_close(terms["at"], expected, rtol=1e-5, atol=1e-10)


def _block_mean(f: torch.Tensor, size: int) -> torch.Tensor:
    b, c, h, w = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean(dim=(3, 5))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_mismatched_spatial_sizes_pool_the_larger_map(mode: str) -> None:
    ctx = context(student=[(4, 16), (6, 4)], teacher=[(5, 8), (9, 8)])
    student, teacher, batch = outputs(ctx, batch=2, seed=3)
    got = AT(ATOptions(ce_weight=0.0, beta=1.0, mode=mode), ctx)(student, teacher, batch)
    assert set(got) == {"at"}
    pooled_s = {1: _block_mean(student.feats[1], 8), 2: student.feats[2]}
    pooled_t = {1: teacher.feats[1], 2: _block_mean(teacher.feats[2], 4)}
    expected = _td_at(pooled_s, pooled_t, [1, 2], mode)
    torch.testing.assert_close(got["at"], expected, rtol=1e-5, atol=1e-10)


def test_other_exponents_against_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    f_t = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    p = 3.0

    def q(f: torch.Tensor, b: int) -> list[float]:
        raw = [sum(f[b, c, i, j].item() ** p for c in range(f.shape[1])) / f.shape[1]
               for i in range(4) for j in range(4)]
        norm = sum(v * v for v in raw) ** 0.5
        return [v / norm for v in raw]

    squares = [(a - b) ** 2 for n in range(2) for a, b in zip(q(f_s, n), q(f_t, n), strict=True)]
    torch.testing.assert_close(at_stage_loss(f_s, f_t, p),
                               torch.tensor(sum(squares) / len(squares), dtype=torch.float64))
    assert attention_map(f_s.half(), 2.0).dtype == torch.float32


def test_stage_selection_imagenet_layer3_and_layer4() -> None:
    four = [(4, 16), (6, 8), (8, 4), (10, 2)]
    ctx = context(four, four)
    opts = ATOptions(stages=[3, 4])
    needs = AT.requirements(opts)
    assert needs.teacher_stages == needs.student_stages == (3, 4) and needs.teacher_fields == ()
    method = AT(opts, ctx)
    assert [(s.index, t.index) for s, t in method.pairs] == [(3, 3), (4, 4)]
    student, teacher, batch = outputs(ctx, batch=2)
    expected = 1000.0 * _td_at(student.feats, teacher.feats, [3, 4], "code")
    torch.testing.assert_close(method(student, teacher, batch)["at"], expected, rtol=1e-5,
                               atol=1e-10)
    assert [s.index for s, _ in AT(ATOptions(), ctx).pairs] == [1, 2, 3, 4]


def test_unpaired_stages_bad_options_and_the_gradient() -> None:
    ctx = context(student=STUDENT, teacher=[*TEACHER, (14, 2)])
    with pytest.raises(ValueError, match=r"method at: stages \['all'\] select 3 student maps"):
        AT(ATOptions(), ctx)
    AT(ATOptions(stages=[1, 2, -1]), ctx)  # explicit indices pair them
    parse = METHODS.get("at").parse_options
    with pytest.raises(ConfigError, match=r"method.stages: expected stage indices"):
        parse({"stages": ["last"]}, "method", "run.yaml")
    with pytest.raises(ConfigError, match=r"method.mode: expected one of 'code', 'paper'"):
        parse({"mode": "both"}, "method", "run.yaml")
    with pytest.raises(ConfigError, match=r"method.p: expected an exponent > 0"):
        parse({"p": 0}, "method", "run.yaml")
    assert parse({"stages": [3, 4]}, "method", "run.yaml").stages == [3, 4]
    ok = context(STUDENT, TEACHER)
    student, teacher, batch = outputs(ok)
    for f in student.feats.values():
        f.requires_grad_(True)
    AT(ATOptions(), ok)(student, teacher, batch)["at"].backward()
    assert student.feats[3].grad is not None and student.feats[3].grad.abs().sum() > 0
