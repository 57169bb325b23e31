"""HSAKD against explicit float64 loops (both phases); its heads replicate the networks' later
stages (CIFAR ResNet, WRN, torchvision ResNet) and other networks are refused; the method runs
real networks on a rotated batch with the teacher phase's heads loaded and frozen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.data.rotate import rotate_batch
from pipeline.distill.base import MethodContext
from pipeline.distill.hsakd import (
    HSAKD,
    HSAKDOptions,
    HSAKDTeacher,
    HSAKDTeacherOptions,
    aux_pretrain_loss,
    hsakd_terms,
)
from pipeline.distill.hsakd_heads import aux_heads
from pipeline.models import build_model
from pipeline.types import Batch, ModelOutput, TeacherOutput

B, C = 3, 4


def _softmax(row: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def _kl_loop(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    total = 0.0
    for r in range(s.shape[0]):
        p_s, p_t = _softmax(s[r].tolist(), T), _softmax(t[r].tolist(), T)
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    return total / s.shape[0] * T * T


def _ce_loop(z: torch.Tensor, y: list[int]) -> float:
    out = 0.0
    for r, label in enumerate(y):
        row = z[r].tolist()
        out += math.log(sum(math.exp(v) for v in row)) - row[label]
    return out / len(y)


def _rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 4 * B
    z_s, z_t = torch.randn(n, C, generator=g) * 2, torch.randn(n, C, generator=g) * 2
    s_aux = [torch.randn(n, 4 * C, generator=g) * 2 for _ in range(3)]
    t_aux = [torch.randn(n, 4 * C, generator=g) * 2 for _ in range(3)]
    labels = torch.randint(0, C, (B,), generator=g).repeat_interleave(4)
    rotation = torch.arange(4).repeat(B)
    return z_s, z_t, s_aux, t_aux, labels, rotation


@pytest.mark.parametrize("seed", [0, 1])
def test_terms_equal_loops(seed: int) -> None:
    z_s, z_t, s_aux, t_aux, labels, rotation = _rows(seed)
    o = HSAKDOptions(T=3.0, ce_weight=0.5, aux_weight=2.0, kd_weight=1.5)
    terms = hsakd_terms(z_s, z_t, s_aux, t_aux, labels, rotation, o)
    normal = [r for r in range(4 * B) if int(rotation[r]) == 0]
    ce = _ce_loop(z_s[normal].double(), [int(labels[r]) for r in normal])
    aux = sum(_kl_loop(s.double(), t.double(), 3.0) for s, t in zip(s_aux, t_aux, strict=True))
    kd = _kl_loop(z_s.double(), z_t.double(), 3.0)  # all 4B rows, rotated ones included
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert terms["hsakd_aux"].item() == pytest.approx(2.0 * aux, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(1.5 * kd, rel=1e-5)


def test_phase_one_equals_loop() -> None:
    _, _, s_aux, _, labels, rotation = _rows(2)
    joint = [4 * int(y) + int(k) for y, k in zip(labels, rotation, strict=True)]
    expected = sum(_ce_loop(z.double(), joint) for z in s_aux)
    assert aux_pretrain_loss(s_aux, labels, rotation).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arch,stages", [
    ("resnet20", ("layer1", "layer2", "layer3")),
    ("wrn_16_2", ("block1", "block2", "block3")),
    ("resnet18", ("layer1", "layer2", "layer3", "layer4")),
])
def test_heads_replicate_the_remaining_stages(arch: str, stages: tuple[str, ...]) -> None:
    net = build_model(arch, C)
    heads = aux_heads(arch, C, 4 * C)
    assert len(heads) == len(stages)
    for i, head in enumerate(heads):
        later = stages[i + 1:]
        if later:  # a fresh copy of each remaining stage: the network's weights fit it exactly
            for copy, name in zip(head.stages, later, strict=True):
                copy.load_state_dict(getattr(net, name).state_dict())
        else:  # the last head: one more stage at the last width, stride 1
            assert len(head.stages) == 1
        assert head.fc.out_features == 4 * C and torch.all(head.fc.bias == 0)
    size = 32 if arch != "resnet18" else 64
    out = net.eval()(torch.randn(2, 3, size, size), feats=True)
    for i, head in enumerate(heads.eval()):
        assert head(out.feats[i + 1]).shape == (2, 4 * C)
    last = heads[-1].stages(out.feats[len(stages)])
    assert last.shape == out.feats[len(stages)].shape  # stride 1, same width


def test_other_networks_are_refused() -> None:
    with pytest.raises(ValueError, match="'vgg8'.*only CIFAR ResNets"):
        aux_heads("vgg8", C, 4 * C)


def _ctx(student: str, teacher: str, load: bool) -> MethodContext:
    s, t = build_model(student, C), build_model(teacher, C)
    return MethodContext(num_classes=C, student_dim=s.embedding_dim, teacher_dim=t.embedding_dim,
                         epochs=1, steps_per_epoch=1, student_stages=s.stage_info(32),
                         teacher_stages=t.stage_info(32), load_teacher=load,
                         student_arch=student, teacher_arch=teacher)


def test_method_on_networks_with_loaded_heads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", C), build_model("wrn_16_1", C).eval()
    phase1 = HSAKDTeacher(HSAKDTeacherOptions(), _ctx("resnet8", "wrn_16_1", False))
    torch.save(phase1.state_dict(), tmp_path / "method.pt")
    method = HSAKD(HSAKDOptions(teacher_heads=str(tmp_path / "method.pt")),
                   _ctx("resnet8", "wrn_16_1", True)).train()
    assert not method.teacher_heads.training and method.student_heads.training
    raw = Batch(torch.randn(B, 3, 32, 32), torch.tensor([0, 3, 1]), torch.arange(B),
                torch.zeros(B, dtype=torch.long))
    batch = rotate_batch(raw, 4)
    s_out = student(batch.images, feats=(1, 2, 3))
    with torch.no_grad():
        t_out = teacher(batch.images, feats=(1, 2, 3))
    terms = method(s_out, TeacherOutput(logits=t_out.logits, feats=t_out.feats), batch)
    with torch.no_grad():
        s_aux = [h(s_out.feats[i + 1]) for i, h in enumerate(method.student_heads)]
        t_aux = [h.eval()(t_out.feats[i + 1]) for i, h in enumerate(phase1.teacher_heads)]
    ref = hsakd_terms(s_out.logits, t_out.logits, s_aux, t_aux, batch.labels, batch.rotation,
                      method.opts)
    for k in ref:
        torch.testing.assert_close(terms[k], ref[k], rtol=1e-5, atol=1e-6)
    sum(terms.values()).backward()  # the student heads' gradients reach the backbone
    assert student.conv1.weight.grad is not None
    assert all(p.grad is None for p in method.teacher_heads.parameters())
    p1 = phase1.train()(None, TeacherOutput(feats=t_out.feats), batch)["aux_ce"]
    assert torch.isfinite(p1) and "aux_top1" in phase1.epoch_metrics()
    with pytest.raises(ValueError, match="data.rotations: 4"):
        method(ModelOutput(s_out.logits[:B], s_out.embedding[:B]), None, raw)
