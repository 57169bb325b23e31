"""FitNet: the hint loss against an explicit loop, ConvReg's kernel rule, the whole term against
a hand-written 1×1 regressor, requirements, and the paper's two-stage form as a phase."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.errors import ConfigError
from pipeline.distill.base import MAIN_PHASE, METHODS
from pipeline.distill.compose import Compose, ComposeOptions
from pipeline.distill.feature_ops import ConvReg
from pipeline.distill.fitnet import HINT_PHASE, FitNet, FitNetOptions, hint_loss, lower_parameters
from pipeline.distill.kd import KDOptions
from pipeline.models import build_model
from pipeline.types import StageInfo
from tests.feature_helpers import context, outputs


def test_hint_loss_equals_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    total = 0.0
    for idx in itertools.product(*(range(n) for n in a.shape)):
        total += (a[idx].item() - b[idx].item()) ** 2
    torch.testing.assert_close(hint_loss(a, b), torch.tensor(total / a.numel(), dtype=a.dtype),
                               rtol=1e-12, atol=0)
    assert hint_loss(a.half(), b.half()).dtype == torch.float32  # cache maps are fp16


def _info(c: int, h: int) -> StageInfo:
    return StageInfo(2, "stage2", c, h, h, 32 // h, True)


@pytest.mark.parametrize(("s_h", "t_h", "kind", "kernel", "stride"), [
    (8, 8, torch.nn.Conv2d, (1, 1), (1, 1)),
    (16, 8, torch.nn.Conv2d, (3, 3), (2, 2)),  # student twice the teacher: 3×3 stride 2
    (4, 8, torch.nn.ConvTranspose2d, (4, 4), (2, 2)),  # half: 4×4 transposed, stride 2
    (7, 4, torch.nn.Conv2d, (4, 4), (1, 1)),  # larger, not twice: kernel 1 + 7 − 4
])
def test_convreg_kernel_rule(s_h: int, t_h: int, kind: type, kernel: tuple, stride: tuple) -> None:
    reg = ConvReg(_info(3, s_h), _info(7, t_h))
    assert type(reg.conv) is kind and reg.conv.kernel_size == kernel
    assert reg.conv.stride == stride and reg.conv.bias is not None
    out = reg(torch.randn(2, 3, s_h, s_h))
    assert out.shape == (2, 7, t_h, t_h) and (out >= 0).all()


def test_convreg_refuses_a_much_smaller_student() -> None:
    with pytest.raises(ValueError, match=r"student height 3 < teacher height 8"):
        ConvReg(_info(3, 3), _info(7, 8))


def _by_hand(method: FitNet, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """beta·mean((ReLU(BN_train(W f_s + b)) − f_t)²) for a 1×1 ConvReg, written out."""
    conv, bn = method.regressor.conv, method.regressor.bn
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], f_s) + conv.bias[None, :, None, None]
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), correction=0, keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None]
    y = (y + bn.bias[None, :, None, None]).clamp_min(0)
    return method.opts.beta * ((y - f_t) ** 2).mean()


def test_fitnet_terms_with_mismatched_channels_batch_of_two() -> None:
    torch.manual_seed(0)
    ctx = context(student=[(4, 16), (6, 8), (8, 4)], teacher=[(5, 16), (9, 8), (12, 4)])
    method = FitNet(FitNetOptions(), ctx).double()
    with torch.no_grad():  # BN's affine parameters away from (1, 0)
        method.regressor.bn.weight.uniform_(0.5, 1.5)
        method.regressor.bn.bias.uniform_(-0.5, 0.5)
    student, teacher, batch = outputs(ctx, batch=2)
    terms = method(student, teacher, batch)
    assert set(terms) == {"ce", "fitnet"}
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student.logits.float(), batch.labels))
    expected = _by_hand(method, student.feats[2], teacher.feats[2])
    torch.testing.assert_close(terms["fitnet"], expected, rtol=1e-5, atol=1e-8)
    terms["fitnet"].backward()
    assert method.regressor.conv.weight.grad is not None


@pytest.mark.parametrize(("s_h", "t_h"), [(16, 8), (4, 8)])
def test_fitnet_mismatched_spatial_sizes(s_h: int, t_h: int) -> None:
    torch.manual_seed(0)
    ctx = context(student=[(4, 16), (6, s_h)], teacher=[(5, 16), (9, t_h)])
    method = FitNet(FitNetOptions(ce_weight=0.0, beta=2.0), ctx).double()
    student, teacher, batch = outputs(ctx, batch=2)
    terms = method(student, teacher, batch)
    assert set(terms) == {"fitnet"}
    regressed = method.regressor(student.feats[2])
    assert regressed.shape == teacher.feats[2].shape
    torch.testing.assert_close(terms["fitnet"], 2.0 * ((regressed - teacher.feats[2]) ** 2).mean())


def test_requirements_and_composition_with_kd() -> None:
    needs = FitNet.requirements(FitNetOptions())
    assert needs.teacher_stages == needs.student_stages == (2,)
    assert needs.teacher_fields == () and not needs.preact and needs.uses_student_logits
    assert not FitNet.requirements(FitNetOptions(ce_weight=0)).uses_student_logits
    opts = ComposeOptions({"kd": KDOptions(ce_weight=1, kd_weight=1),
                           "fitnet": FitNetOptions(ce_weight=0)})
    both = Compose.requirements(opts)
    assert both.teacher_outputs == ("logits", "feats") and both.uses_student_logits
    ctx = context(student=[(4, 16), (6, 8)], teacher=[(5, 16), (9, 8)])
    method = Compose(opts, ctx).double()
    assert set(method(*outputs(ctx, batch=4))) == {"ce", "kd", "fitnet"}
    assert any(k.startswith("terms.fitnet.regressor.") for k in method.state_dict())


def test_two_stage_form_is_a_hint_phase() -> None:
    opts = FitNetOptions(hint_epochs=3, hint_lr=0.02)
    [phase] = FitNet.phases(opts)
    assert (phase.name, phase.epochs, phase.lr, phase.uses_student) == (HINT_PHASE, 3, 0.02, True)
    assert FitNet.phases(FitNetOptions()) == ()
    ctx = context(student=[(4, 16), (6, 8)], teacher=[(5, 16), (9, 8)])
    method = FitNet(opts, ctx).double()
    inputs = outputs(ctx, batch=2)
    method.set_phase(HINT_PHASE)
    assert set(method(*inputs)) == {"fitnet"}
    method.set_phase(MAIN_PHASE)
    assert set(method(*inputs)) == {"ce"}  # the paper's second stage: no hint term


def test_hint_phase_trains_the_student_up_to_the_hint_stage() -> None:
    student = build_model("resnet8", 5)
    lower = lower_parameters(student, 2, 32)
    named = {id(p): n for n, p in student.named_parameters()}
    names = {named[id(p)] for p in lower}
    assert names and all(n.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"} for n in names)
    assert any(n.startswith("layer2.") for n in names) and any(n.startswith("conv1") for n in names)
    expected = [p for n, p in student.named_parameters()
                if n.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}]
    assert [id(p) for p in lower] == [id(p) for p in expected]
    assert student.training and all(p.grad is None for p in student.parameters())
    ctx = context(student=[(16, 32), (32, 16), (64, 8)], teacher=[(16, 32), (32, 16), (64, 8)])
    method = FitNet(FitNetOptions(hint_epochs=1), ctx)
    params = method.phase_parameters(FitNet.phases(method.opts)[0], student)
    assert [id(p) for p in params] == [id(p) for p in [*expected, *method.regressor.parameters()]]


def test_bad_options_and_missing_inputs() -> None:
    parse = METHODS.get("fitnet").parse_options
    with pytest.raises(ConfigError, match=r"run.yaml: method.beta: expected a weight >= 0"):
        parse({"beta": -1}, "method", "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: method.hint_lr: expected a learning rate"):
        parse({"hint_epochs": 2, "hint_lr": 0}, "method", "run.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'method.hint_layers'"):
        parse({"hint_layers": 2}, "method", "run.yaml")
    no_teacher = context(student=[(4, 16)], teacher=[])
    no_teacher = type(no_teacher)(5, 6, None, 2, 3, student_stages=no_teacher.student_stages)
    with pytest.raises(ValueError, match="method fitnet: reads the teacher's stage maps, but the "
                                         "run has no teacher"):
        FitNet(FitNetOptions(), no_teacher)
    ctx = context(student=[(4, 16), (6, 8)], teacher=[(5, 16), (9, 8)])
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        FitNet(FitNetOptions(hint_layer=5), ctx)
    student, teacher, batch = outputs(ctx)
    teacher.feats = {1: teacher.feats[1]}
    with pytest.raises(ValueError, match=r"expected the teacher's stage map 2 \(stage2\), found "
                                         r"stages \[1\]"):
        FitNet(FitNetOptions(), ctx).double()(student, teacher, batch)
