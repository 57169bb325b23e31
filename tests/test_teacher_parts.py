"""Parts of the teacher's weights for methods (``Requirements.teacher_modules``): the frozen
classifier (SRRL) and the BN before each stage's final ReLU (OFD), for online and cached
teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.data import build_index
from pipeline.distill.requirements import Requirements, merge
from pipeline.models import build_model
from pipeline.teacher.cache_writer import write_cache
from pipeline.teacher.parts import extract_teacher_parts, frozen_classifier, preact_bn_stats
from pipeline.train.build import build_teacher_source

CONFIG = """\
name: parts-test
data: {{dataset: synthetic, synthetic_size: 8, augment: cifar, image_size: 32, batch_size: 4,
       eval_batch_size: 4, workers: 0, views: 1}}
model: {{arch: resnet8}}
teacher: {{arch: resnet20, weights: {weights}, cache_dir: {cache}}}
method: {{name: kd}}
optim: {{epochs: 1}}
tracking: {{enabled: false}}
train: {{progress: false}}
"""


def test_requirements_name_teacher_modules_and_merge_them() -> None:
    with pytest.raises(ValueError, match="teacher_modules: expected some of"):
        Requirements(teacher_modules=("fc",))
    a = Requirements(teacher_modules=("preact_bn",), teacher_stages=("all",), preact=True)
    b = Requirements(teacher_modules=("classifier",))
    assert merge([("a", a), ("b", b)]).teacher_modules == ("classifier", "preact_bn")
    assert merge([("b", Requirements())]).teacher_modules == ()
    assert a.without_teacher().teacher_modules == ()


def _capture(module: torch.nn.Module, store: dict, key: str, output: bool = True):
    def hook(mod, args, out=None):  # forward hook (output) or pre-hook (input)
        store[key] = (out if output else args[0]).detach().clone()
    if output:
        return module.register_forward_hook(hook)
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("arch", ["wrn_16_2", "vgg8"])
def test_preact_bn_output_is_the_preact_map(arch: str) -> None:
    """Pre-activation WRN and VGG: the returned BN's output is exactly the stage's pre-ReLU map."""
    torch.manual_seed(0)
    net = build_model(arch, 5).eval()
    info = net.stage_info(32)
    for s in info[1:]:
        bn, seen = net.preact_bn(s.index), {}
        handle = _capture(bn, seen, "bn")
        with torch.no_grad():
            pre = net(torch.randn(2, 3, 32, 32), feats=(s.index,), preact=True).feats[s.index]
        handle.remove()
        assert torch.equal(seen["bn"], pre), s
    assert net.preact_bn(0) is None and net.preact_bn(len(info)) is None


@pytest.mark.parametrize("arch,size", [("resnet20", 32), ("resnet18", 64), ("resnet50_cifar", 32)])
def test_preact_bn_plus_identity_shortcut_is_the_preact_map(arch: str, size: int) -> None:
    """Residual nets: the last block's BN output plus its (identity) shortcut input is the map."""
    torch.manual_seed(0)
    net = build_model(arch, 5).eval()
    stages = [s.index for s in net.stage_info(size)[1:]]
    seen: dict = {}
    hooks = []
    for i in stages:
        hooks += [_capture(net.preact_bn(i), seen, f"bn{i}"),
                  _capture(getattr(net, f"layer{i}")[-1].conv1, seen, f"x{i}", output=False)]
    with torch.no_grad():
        pre = net(torch.randn(2, 3, size, size), feats=tuple(stages), preact=True).feats
    for h in hooks:
        h.remove()
    for i in stages:
        torch.testing.assert_close(seen[f"bn{i}"] + seen[f"x{i}"], pre[i], rtol=0, atol=1e-6)


def test_stages_without_bn_before_relu_are_refused() -> None:
    net = build_model("mobilenetv2", 5)
    assert all(net.preact_bn(i) is None for i in range(len(net.stage_info(32))))
    with pytest.raises(ValueError, match="CifarMobileNetV2 has no BatchNorm right before a ReLU "
                                         "at the end of stage 2"):
        preact_bn_stats(net, (2,))


def test_frozen_classifier_is_a_detached_copy() -> None:
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", 7)  # (Dropout, Linear) head: the Linear is copied
    fc = frozen_classifier(net)
    assert isinstance(fc, torch.nn.Linear) and not fc.training
    assert torch.equal(fc.weight, net.classifier.weight) and not fc.weight.requires_grad
    with torch.no_grad():
        net.classifier.weight.add_(1.0)
    assert not torch.equal(fc.weight, net.classifier.weight)
    assert extract_teacher_parts(net, ()) is None


@pytest.fixture(scope="module")
def cached_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(3)
    teacher = build_model("resnet20", 10)
    for m in teacher.modules():  # non-trivial BN affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    torch.save({"model": teacher.state_dict()}, root / "t.pt")
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(weights=root / "t.pt", cache=root / "cache"))
    write_cache(load_run_config(cfg), ("logits", "feats"), stages=(-1,), preact=True,
                progress=False)
    return cfg, root / "t.pt"


@pytest.mark.parametrize("source", ["online", "cached"])
def test_build_takes_the_parts_from_the_teacher_weights(cached_setup, source: str) -> None:
    cfg, weights = cached_setup
    spec = load_run_config(cfg, [f"teacher.source={source}"])
    needs = Requirements(teacher_fields=("logits",), teacher_stages=(-1,), preact=True,
                         teacher_modules=("classifier", "preact_bn"))
    index = build_index(spec.data, "train")
    teacher, _ = build_teacher_source(spec, needs, 10, True, index)
    state = torch.load(weights)["model"]
    parts = teacher.parts
    assert torch.equal(parts.classifier.weight, state["fc.weight"])
    assert torch.equal(parts.classifier.bias, state["fc.bias"])
    assert not any(p.requires_grad for p in parts.classifier.parameters())
    assert list(parts.preact_bn) == [3]  # resnet20's last stage
    bn = parts.preact_bn[3]
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name), state[f"layer3.2.bn2.{name}"]), name
    plain = Requirements(teacher_fields=("logits",), teacher_stages=(-1,), preact=True)
    assert build_teacher_source(spec, plain, 10, True, index)[0].parts is None
