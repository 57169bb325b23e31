"""FT: the factor loss (RepDistiller's form transcribed; the paper's against torchdistill 1.1.5),
the paraphraser and translator, and the two phases (in a real run:
tests/test_phased_methods.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchdistill.losses.mid_level import FTLoss

from pipeline.distill.base import MAIN_PHASE, MethodContext, Phase
from pipeline.distill.ft import FT, FTOptions, ft_loss
from pipeline.distill.losses import cross_entropy
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput


def _rd_factor_transfer(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller ``FactorTransfer(p1=2, p2=1).factor_loss``, transcribed (float64)."""
    f_s, f_t = f_s.double(), f_t.double()
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))

    def factor(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    return (factor(f_s) - factor(f_t)).abs().mean()


def _td_paper(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    loss = FTLoss(p=1, reduction="mean")
    return loss({"translator": {"output": f_s}}, {"paraphraser": {"output": f_t}})


@pytest.mark.parametrize(("s_shape", "t_shape"), [
    ((4, 8, 4, 4), (4, 8, 4, 4)),
    ((3, 5, 4, 4), (3, 8, 4, 4)),   # mismatched channels (code form only compares maps)
    ((3, 8, 8, 8), (3, 8, 4, 4)),   # student larger: pooled
    ((2, 8, 2, 2), (2, 8, 4, 4)),   # teacher larger, batch of 2
])
def test_code_form_equals_repdistiller(s_shape: tuple, t_shape: tuple) -> None:
    g = torch.Generator().manual_seed(sum(s_shape) + sum(t_shape))
    s, t = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g)
    value = ft_loss(s, t, "code")
    assert value.item() == pytest.approx(_rd_factor_transfer(s, t).item(), rel=1e-5)


@pytest.mark.parametrize("b", [2, 5])
def test_paper_form_equals_torchdistill(b: int) -> None:
    g = torch.Generator().manual_seed(b)
    s, t = torch.randn(b, 6, 4, 4, generator=g), torch.randn(b, 6, 4, 4, generator=g)
    torch.testing.assert_close(ft_loss(s, t, "paper"), _td_paper(s, t), rtol=1e-5, atol=1e-8)
    assert abs(ft_loss(s, t, "paper") - ft_loss(s, t, "code")) > 1e-4  # two different losses
    small = torch.randn(b, 6, 2, 2, generator=g)  # spatial mismatch: pooled, then compared
    torch.testing.assert_close(ft_loss(small, t, "paper"),
                               _td_paper(small, F.adaptive_avg_pool2d(t, (2, 2))))
    with pytest.raises(ValueError, match="factors of the same shape"):
        ft_loss(torch.randn(b, 4, 4, 4), t, "paper")


def _stages(*shapes: tuple[int, int]) -> tuple[StageInfo, ...]:
    return tuple(StageInfo(i, f"s{i}", c, h, h, 32 // h, False) for i, (c, h) in enumerate(shapes))


CTX = MethodContext(3, 8, 16, epochs=2, steps_per_epoch=1,
                    student_stages=_stages((4, 8), (6, 4), (8, 2)),
                    teacher_stages=_stages((4, 8), (8, 4), (16, 4)))


def _inputs(seed: int = 0) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = torch.Generator().manual_seed(seed)
    student = ModelOutput(torch.randn(2, 3, generator=g), torch.zeros(2, 8),
                          {2: torch.randn(2, 8, 2, 2, generator=g)})
    teacher = TeacherOutput(feats={2: torch.randn(2, 16, 4, 4, generator=g).relu()})
    batch = Batch(torch.zeros(2, 3, 2, 2), torch.tensor([0, 2]), torch.arange(2), torch.zeros(2))
    return student, teacher, batch


def test_modules_follow_repdistiller() -> None:
    method = FT(FTOptions(), CTX)
    assert method.needs.student_stages == method.needs.teacher_stages == (-1,)
    assert not method.needs.preact and method.needs.teacher_fields == ()
    assert FT.phases(FTOptions()) == (Phase("paraphraser", 30, None, uses_student=False),)
    convs = [m for m in method.paraphraser.encoder if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 16), (16, 8), (8, 8)]
    deconvs = [m for m in method.paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(8, 8), (8, 16), (16, 16)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.paraphraser.modules())
    relus = [m for m in method.paraphraser.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 6 and all(r.negative_slope == 0.1 for r in relus)
    convs = [m for m in method.translator if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 8), (8, 8)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in method.translator) == 3
    plain = FT(FTOptions(translator_bn=False), CTX)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.translator)
    assert method.phase_parameters(Phase("paraphraser", 1, 0.01), nn.Linear(1, 1)) == list(
        method.paraphraser.parameters())


def test_paraphraser_phase_reconstructs_the_teacher_map_without_the_student() -> None:
    method = FT(FTOptions(), CTX)
    _, teacher, batch = _inputs()
    method.set_phase("paraphraser")
    method.train()
    assert method.paraphraser.training
    terms = method(None, teacher, batch)
    assert list(terms) == ["reconstruction"]
    f_t = teacher.feats[2]
    torch.testing.assert_close(terms["reconstruction"], F.mse_loss(method.paraphraser(f_t), f_t))


def test_main_phase_trains_the_translator_with_a_frozen_paraphraser() -> None:
    method = FT(FTOptions(), CTX)
    student, teacher, batch = _inputs(1)
    student.feats[2].requires_grad_(True)
    method.set_phase(MAIN_PHASE)
    method.train()
    assert not method.paraphraser.training and method.translator.training
    terms = method(student, teacher, batch)
    assert sorted(terms) == ["ce", "ft"]
    torch.testing.assert_close(terms["ce"], cross_entropy(student.logits, batch.labels))
    factor_s = method.translator(student.feats[2])
    factor_t = method.paraphraser.encoder(teacher.feats[2])
    torch.testing.assert_close(terms["ft"], 200 * _rd_factor_transfer(factor_s, factor_t).float())
    terms["ft"].backward()
    assert all(p.grad is None for p in method.paraphraser.parameters())
    assert all(p.grad is not None for p in method.translator.parameters())
    assert student.feats[2].grad is not None
    paper = FT(FTOptions(mode="paper", ce_weight=0), CTX)
    paper.set_phase(MAIN_PHASE)
    assert list(paper(student, teacher, batch)) == ["ft"]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="mode: expected 'code' or 'paper'"):
        FTOptions(mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paraphraser_epochs: expected >= 1"):
        FTOptions(paraphraser_epochs=0)
    with pytest.raises(ValueError, match="rate: expected 0 < rate <= 1"):
        FTOptions(rate=0)
