"""The method contract for feature-map methods: stage descriptions before training, stage
selection, one requirements object, and the run facts a method is built with."""

from __future__ import annotations

import pytest
import torch

from pipeline.distill.base import MethodContext
from pipeline.distill.requirements import Requirements, merge
from pipeline.models import MODELS, build_model
from pipeline.models.features import resolve_stages
from pipeline.types import StageInfo

ALIASES = {"ResNet50", "mobile_half", "MobileNetV2", "ShuffleV1", "ShuffleV2"}
UNIQUE = sorted(set(MODELS.names()) - ALIASES)


def _check_info_against_forward(net: torch.nn.Module, size: int) -> None:
    info = net.stage_info(size)
    x = torch.randn(2, 3, size, size)
    net.eval()
    with torch.no_grad():
        post = net(x, feats=True).feats
        pre = net(x, feats=True, preact=True).feats if getattr(net, "offers_preact", True) else post
    assert [s.index for s in info] == sorted(post) == list(range(len(info)))
    for s in info:
        assert isinstance(s, StageInfo)
        assert (2, *s.shape) == tuple(post[s.index].shape) == tuple(pre[s.index].shape), s
        assert s.stride == round(size / s.height)
        assert s.has_preact == (not torch.equal(pre[s.index], post[s.index])), s


@pytest.mark.parametrize("arch", UNIQUE)
def test_stage_info_agrees_with_a_forward(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(arch, 5)
    size = 64 if net.native_size == 224 else net.native_size
    net.stage_info(size)
    assert net.training  # the probe leaves the mode as it was
    _check_info_against_forward(net, size)


def test_stage_info_of_a_timm_net_and_its_logits_equal_timm() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = build_model("timm:resnet10t", 5)
    _check_info_against_forward(net, 64)
    assert [s.name for s in net.stage_info(64)] == ["act1", "layer1", "layer2", "layer3",
                                                   "layer4"]
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    ref.load_state_dict(net.state_dict())  # the state dict is exactly timm's
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, ref(x))
        with pytest.raises(ValueError, match="post-activation stage maps only"):
            net(x, feats=(1,), preact=True)
    with pytest.raises(ValueError, match="timm has no model"):
        build_model("timm:not_a_timm_model", 5)


def test_probe_leaves_batchnorm_statistics_alone() -> None:
    net = build_model("wrn_16_1", 10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.stage_info(32)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_2", "vgg8", "resnet18"])
def test_forward_returns_only_the_stages_asked_for(arch: str) -> None:
    net = build_model(arch, 5).eval()
    size = 64 if net.native_size == 224 else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        every = net(x, feats=True, preact=True).feats
        some = net(x, feats=(3, 1), preact=True).feats
        assert net(x, feats=()).feats is None
    assert list(some) == [3, 1]
    for s in some:
        torch.testing.assert_close(some[s], every[s])


def test_resolve_stages() -> None:
    assert resolve_stages(("all",), 4) == (1, 2, 3)
    assert resolve_stages((-1,), 4) == (3,)
    assert resolve_stages((2, -2, "all"), 5) == (2, 3, 1, 4)
    with pytest.raises(ValueError, match="stage 4 does not exist"):
        resolve_stages((4,), 4)
    with pytest.raises(ValueError, match="expected stage indices"):
        resolve_stages(("last",), 4)


def test_requirements_merge() -> None:
    a = Requirements(teacher_fields=("logits",), student_stages=(2,), teacher_stages=(2,))
    b = Requirements(teacher_fields=("embedding",), student_stages=("all",),
                     teacher_stages=(-1,), uses_student_logits=False)
    both = merge([("a", a), ("b", b)])
    assert both.teacher_fields == ("logits", "embedding")
    assert both.student_stages == (2, "all") and both.teacher_stages == (2, -1)
    assert both.teacher_outputs == ("logits", "embedding", "feats")
    assert both.uses_student_logits and both.needs_teacher
    alone = Requirements(needs_teacher=False, teacher_fields=())
    assert merge([("v", alone)]).teacher_outputs == ()
    pre = Requirements(student_stages=(1,), preact=True)
    with pytest.raises(ValueError, match="disagree on preact"):
        merge([("a", a), ("pre", pre)])
    assert merge([("pre", pre), ("plain", Requirements())]).preact  # no maps: no opinion
    with pytest.raises(ValueError, match="stage maps are teacher_stages"):
        Requirements(teacher_fields=("feats",))


def test_run_facts_reach_the_method(tmp_path) -> None:
    from pipeline.catalog import load_run_config
    from pipeline.train.build import build_parts
    from tests.conftest import ROOT

    spec = load_run_config(ROOT / "configs/demo/kd.yaml", [
        "data.dataset=synthetic", "data.synthetic_size=12", "teacher.weights=null",
        f"run_dir={tmp_path}"], check_paths=False)
    parts = build_parts(spec, steps_per_epoch=3, load_teacher=False)
    ctx: MethodContext = parts.method.ctx
    assert ctx.num_train_samples == len(parts.train_index) == 12
    assert torch.equal(ctx.train_labels, torch.from_numpy(parts.train_index.labels))
    assert ctx.student_stages == parts.student.stage_info(spec.data.image_size)
    assert ctx.teacher_stages and ctx.teacher_stages[-1].channels == 64  # resnet20's last stage
    assert ctx.teacher_maps((-1,)) == (ctx.teacher_stages[-1],)
    assert ctx.image_size == spec.data.image_size
