"""AB: the activation-boundary loss against torchdistill 1.1.5 and by hand; connectors, the
two phases and composition with KD (the phases in a real run: tests/test_phased_methods.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchdistill.losses.mid_level import AltActTransferLoss

from pipeline.distill.ab import AB, ABOptions, ab_loss, ab_stage_loss, stage_weights
from pipeline.distill.base import MAIN_PHASE, MethodContext, Phase
from pipeline.distill.compose import Compose, ComposeOptions
from pipeline.distill.feature_ops import ConvReg
from pipeline.distill.kd import KDOptions
from pipeline.distill.losses import cross_entropy, kd_loss
from pipeline.models import build_model
from pipeline.models.base import feature_parameters
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput


def _td(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    n = len(students)
    pairs = {f"p{i}": {"student": {"path": f"s{i}", "io": "output"},
                       "teacher": {"path": f"t{i}", "io": "output"},
                       "weight": 3 * 2 ** (i - n + 1) / 1000} for i in range(n)}
    loss = AltActTransferLoss(pairs, margin=1.0, reduction="mean")
    return loss({f"s{i}": {"output": s} for i, s in enumerate(students)},
                {f"t{i}": {"output": t} for i, t in enumerate(teachers)})


def test_stage_loss_by_hand() -> None:
    s = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 2.0])
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, -3.0])
    # t ≤ 0: (s+1)²·[s > −1] → 0, 0.25, ., ., 1, 9; t > 0: (s−1)²·[s ≤ 1] → ., ., 0.25, 0
    assert ab_stage_loss(s, t).item() == pytest.approx(0.25 + 0.25 + 1 + 9)
    assert ab_stage_loss(s, t, margin=0.5).item() == pytest.approx(0 + 0 + 0 + 0 + 0.25 + 6.25)
    assert stage_weights(3) == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("shapes", [
    [(4, 8, 8, 8), (4, 16, 4, 4), (4, 32, 2, 2)],  # three stages
    [(2, 3, 4, 4)],                                 # one stage, batch of 2
])
def test_loss_equals_torchdistill(shapes: list[tuple[int, ...]]) -> None:
    g = torch.Generator().manual_seed(len(shapes))
    s = [torch.randn(*sh, generator=g) * 1.5 for sh in shapes]
    t = [torch.randn(*sh, generator=g) for sh in shapes]
    torch.testing.assert_close(ab_loss(s, t), _td(s, t), rtol=1e-5, atol=1e-7)


def _stages(*shapes: tuple[int, int]) -> tuple[StageInfo, ...]:
    return tuple(StageInfo(i, f"s{i}", c, h, h, 32 // h, True) for i, (c, h) in enumerate(shapes))


S_SHAPES = [(4, 8), (4, 8), (6, 4), (8, 2)]
T_SHAPES = [(4, 8), (4, 8), (12, 4), (16, 4)]  # stage 2: channels differ; stage 3: H is 2×
CTX = MethodContext(3, 8, 8, epochs=2, steps_per_epoch=1, student_stages=_stages(*S_SHAPES),
                    teacher_stages=_stages(*T_SHAPES))


def _inputs(seed: int = 0) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = torch.Generator().manual_seed(seed)
    s = {i: torch.randn(2, c, h, h, generator=g) for i, (c, h) in enumerate(S_SHAPES) if i}
    t = {i: torch.randn(2, c, h, h, generator=g) for i, (c, h) in enumerate(T_SHAPES) if i}
    logits, labels = torch.randn(2, 3, generator=g), torch.tensor([0, 2])
    batch = Batch(torch.zeros(2, 3, 2, 2), labels, torch.arange(2), torch.zeros(2))
    return (ModelOutput(logits, torch.zeros(2, 8), s),
            TeacherOutput(logits=torch.randn(2, 3, generator=g), feats=t), batch)


def test_connectors_phases_and_terms() -> None:
    method = AB(ABOptions(), CTX)
    assert method.needs.preact and method.needs.student_stages == ("all",)
    assert AB.phases(ABOptions()) == (Phase("init", 30, None),)
    assert AB.phases(ABOptions(init_epochs=2, init_lr=0.01)) == (Phase("init", 2, 0.01),)
    kinds = [type(c) for c in method.connectors]
    assert kinds == [nn.Identity, ConvReg, ConvReg]
    assert not method.connectors[1].relu and isinstance(method.connectors[2].conv,
                                                        nn.ConvTranspose2d)
    student, teacher, batch = _inputs()
    method.set_phase("init")
    terms = method(student, teacher, batch)
    mapped = [c(student.feats[i]) for c, i in zip(method.connectors, (1, 2, 3), strict=True)]
    assert list(terms) == ["ab"]
    torch.testing.assert_close(terms["ab"], _td(mapped, [teacher.feats[i] for i in (1, 2, 3)]))
    method.set_phase(MAIN_PHASE)
    main = method(student, teacher, batch)
    assert list(main) == ["ce"]
    torch.testing.assert_close(main["ce"], cross_entropy(student.logits, batch.labels))
    assert AB(ABOptions(ce_weight=0), CTX).forward(student, teacher, batch) == {}


def test_connectors_are_in_eval_mode_in_the_main_phase() -> None:
    method = AB(ABOptions(), CTX)
    method.set_phase("init")
    method.train()
    assert all(m.training for m in method.connectors.modules())
    method.set_phase(MAIN_PHASE)
    assert not any(m.training for m in method.connectors.modules())
    method.train()  # the trainer calls train() every epoch
    assert not any(m.training for m in method.connectors.modules()) and method.training


def test_init_parameters_are_connectors_and_student_features() -> None:
    student = build_model("resnet8", 3)
    method = AB(ABOptions(), CTX)
    params = method.phase_parameters(Phase("init", 1, 0.1), student)
    ids = {id(p) for p in params}
    assert {id(p) for p in method.connectors.parameters()} <= ids
    assert {id(p) for p in feature_parameters(student)} <= ids
    assert not ids & {id(p) for p in student.classifier.parameters()}


def test_composed_with_kd_the_init_phase_trains_ab_alone() -> None:
    opts = ComposeOptions(terms={"kd": KDOptions(T=4, ce_weight=1, kd_weight=1),
                                 "ab": ABOptions(ce_weight=0)})
    assert [p.name for p in Compose.phases(opts)] == ["init"]
    assert Compose.requirements(opts).preact
    assert Compose.requirements(opts).teacher_outputs == ("logits", "feats")
    method = Compose(opts, CTX)
    student, teacher, batch = _inputs(1)
    method.set_phase("init")
    assert list(method(student, teacher, batch)) == ["ab"]
    method.set_phase(MAIN_PHASE)
    terms = method(student, teacher, batch)
    assert sorted(terms) == ["ce", "kd"]
    torch.testing.assert_close(terms["kd"], kd_loss(student.logits, teacher.logits, 4))
    ab = method.terms["ab"]
    assert method.phase_parameters(Phase("init", 30, 0.05), build_model("resnet8", 3))
    assert not any(m.training for m in ab.connectors.modules())


def test_options_and_stage_counts_are_checked() -> None:
    with pytest.raises(ValueError, match="init_epochs: expected >= 1"):
        ABOptions(init_epochs=0)
    with pytest.raises(ValueError, match="init_lr: expected a learning rate > 0"):
        ABOptions(init_lr=0)
    fewer = MethodContext(3, 8, 8, epochs=1, steps_per_epoch=1,
                          student_stages=CTX.student_stages, teacher_stages=CTX.teacher_stages[:3])
    with pytest.raises(ValueError, match="method ab: stages"):
        AB(ABOptions(), fewer)
