"""The model zoo: sizes, checkpoint-compatible names, the ModelOutput contract, weight loading.

The state-dict fingerprints below were computed from HobbitLong/RepDistiller's own
``models/*.py`` (commit b84f547, ``num_classes=100``): sha256 of the sorted ``key:shape`` lines,
first 16 hex digits. Equal fingerprints mean CRD's released teacher checkpoints load strictly.
"""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.models import MODELS, Net, build_model, file_sha256, load_weights
from pipeline.models.weights import hub_checkpoint_path
from pipeline.models.zoo_utils import LinearHead

CIFAR_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_40_1", "wrn_40_2",
    "wrn_40_4", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflev1",
    "shufflev2", "resnet50_cifar",
]
ALIASES = {"mobile_half": "mobilenetv2", "MobileNetV2": "mobilenetv2", "ResNet50": "resnet50_cifar",
           "ShuffleV1": "shufflev1", "ShuffleV2": "shufflev2"}
TV_NAMES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]

REPDISTILLER_FINGERPRINTS = {
    "resnet8": "166d31a811b31c5f", "resnet14": "8525efa6fc491f19",
    "resnet20": "6db44f39e3bff21f", "resnet32": "325ee6108709f7b5",
    "resnet44": "f1263f7b0ed71e1a", "resnet56": "3977b81559d8630f",
    "resnet110": "7f8e5ac1814e480a", "resnet8x4": "5d5871b403f3a649",
    "resnet32x4": "610ad29043c56b33", "resnet50_cifar": "d4a9e0738c8f8385",
    "wrn_16_1": "f6cf46040022f13d", "wrn_16_2": "bdbc50a2b3205f84",
    "wrn_16_4": "6ae64930d24af529", "wrn_40_1": "deef22602ae7584b",
    "wrn_40_2": "bf5731c8e8e2b95f", "wrn_40_4": "b580bd0d2e7297ee",
    "vgg8": "d9f8d7533423754e", "vgg11": "6592bd1869a5938f", "vgg13": "7bec65f1ca17a0bf",
    "vgg16": "b420ddff7e4306ec", "vgg19": "2d318270df30c723",
    "mobilenetv2": "10e9036e17013c38", "shufflev1": "eb3bcbc847930cce",
    "shufflev2": "b7e2c3e764687767",
}

# (arch, classes, parameters in millions as the papers quote them, exact count of this code).
# WRN-16-2 and resnet20 are 0.70M and 0.28M in CRD's Table 1 and in RepDistiller's code (the
# fingerprints above); figures of 0.73M / 0.29M quoted elsewhere do not match that architecture.
PARAM_COUNTS = [
    ("wrn_40_4", 100, 8.97, 8_972_340), ("wrn_40_2", 100, 2.26, 2_255_156),
    ("wrn_16_2", 100, 0.70, 703_284), ("resnet56", 100, 0.86, 861_620),
    ("resnet20", 100, 0.28, 278_324), ("resnet110", 100, 1.73, 1_736_564),
    ("resnet50_cifar", 100, 23.71, 23_705_252), ("wrn_16_4", 10, 2.75, 2_748_890),
    ("wrn_16_1", 10, 0.18, 175_066), ("resnet14", 10, 0.18, 175_258),
    ("resnet8", 10, 0.08, 78_042), ("resnet18", 1000, 11.69, 11_689_512),
    ("resnet34", 1000, 21.80, 21_797_672),
]

# nets whose stage maps end in a ReLU: there relu(preact map) == post-activation map
RELU_STAGES = {"CifarResNet", "CifarBottleneckResNet", "CifarVGG", "CifarShuffleNetV1",
               "CifarShuffleNetV2", "TorchvisionResNet"}
LINEAR_STAGES = {"CifarMobileNetV2", "TorchvisionMobileNetV2"}  # linear bottlenecks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machines this is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _on_meta(arch: str, classes: int) -> Net:
    """Build without allocating or initialising weights: enough for names, shapes and counts."""
    with torch.device("meta"):
        return build_model(arch, classes)


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_registry_holds_every_name_and_alias() -> None:
    assert set(CIFAR_NAMES + TV_NAMES + list(ALIASES)) == set(MODELS.names())
    for alias, name in ALIASES.items():
        assert MODELS.get(alias) is MODELS.get(name)
    with pytest.raises(KeyError, match="did you mean 'resnet32x4'"):
        build_model("resnet32_x4", 10)


@pytest.mark.parametrize(("arch", "classes", "millions", "exact"), PARAM_COUNTS,
                         ids=[f"{a}-{c}" for a, c, _, _ in PARAM_COUNTS])
def test_parameter_counts(arch: str, classes: int, millions: float, exact: int) -> None:
    n = _n_params(_on_meta(arch, classes))
    assert n == exact
    assert abs(n / 1e6 - millions) <= max(0.01 * millions, 0.005), (arch, n)


@pytest.mark.parametrize("arch", sorted(REPDISTILLER_FINGERPRINTS))
def test_state_dict_names_and_shapes_equal_repdistiller(arch: str) -> None:
    assert _fingerprint(_on_meta(arch, 100).state_dict()) == REPDISTILLER_FINGERPRINTS[arch]


def test_state_dict_spot_checks() -> None:
    wrn = build_model("wrn_40_2", 100).state_dict()
    assert wrn["block2.layer.0.convShortcut.weight"].shape == (64, 32, 1, 1)
    assert wrn["fc.weight"].shape == (100, 128)
    assert build_model("resnet8x4", 100).state_dict()["layer1.0.downsample.0.weight"].shape == (
        64, 32, 1, 1)
    assert build_model("vgg8", 100).state_dict()["block4.1.running_var"].shape == (512,)
    mobile = build_model("mobilenetv2", 100).state_dict()
    assert mobile["classifier.0.weight"].shape == (100, 1280)
    assert mobile["blocks.6.0.conv.6.weight"].shape == (160, 480, 1, 1)


@pytest.mark.parametrize("arch", TV_NAMES)
def test_torchvision_state_dict_equals_torchvision(arch: str) -> None:
    ours = _on_meta(arch, 10).state_dict()
    with torch.device("meta"):
        theirs = torchvision.models.get_model(arch, weights=None, num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def _unique_archs() -> list[str]:
    return CIFAR_NAMES + TV_NAMES  # aliases share their factory (checked above)


@pytest.mark.parametrize("arch", _unique_archs())
def test_forward_backward_contract(arch: str) -> None:
    """Batch 2 at the native size for CIFAR nets; torchvision nets at 64 px (CPU time), one of
    them also at its native 224 px in ``test_torchvision_native_size``."""
    torch.manual_seed(0)
    net = build_model(arch, 7)
    assert isinstance(net, Net)
    size = 64 if net.native_size == 224 else net.native_size
    assert net.native_size in (32, 224)
    x = torch.randn(2, 3, size, size)

    plain = net(x)  # training mode
    assert plain.feats is None
    assert plain.logits.shape == (2, 7)
    assert plain.embedding.shape == (2, net.embedding_dim)
    plain.logits.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    head = net.classifier  # the final Linear, or a LinearHead that reads like it
    linear = head.linear if isinstance(head, LinearHead) else head
    assert isinstance(linear, nn.Linear) and linear is list(net.modules())[-1]
    assert head.in_features == net.embedding_dim and head.out_features == 7
    assert head.weight.shape == (7, net.embedding_dim)
    for name, _ in net.named_parameters():  # checkpoint names resolve as attribute paths
        net.get_parameter(name)
    net.eval()
    with torch.no_grad():
        post = net(x[:1], feats=True)  # batch 1 is enough in eval mode
        pre = net(x[:1], feats=True, preact=True)
        torch.testing.assert_close(net.classifier(post.embedding), post.logits)
    assert post.feats and sorted(post.feats) == list(range(len(post.feats)))
    post_maps, pre_maps = list(post.feats.values()), list(pre.feats.values())
    assert all(f.dim() == 4 and f.shape[0] == 1 for f in post_maps)
    torch.testing.assert_close(pre.logits, post.logits)
    assert [f.shape for f in pre_maps] == [f.shape for f in post_maps]
    kind = type(net).__name__
    stem_pre, stem_post = pre_maps[0], post_maps[0]
    torch.testing.assert_close(stem_pre, stem_post)  # the stem map never changes with preact
    if kind in RELU_STAGES:
        for a, b in zip(pre_maps[1:], post_maps[1:], strict=True):
            assert (a < 0).any()  # really before the ReLU
            torch.testing.assert_close(F.relu(a), b)
    elif kind == "WideResNet":  # CRD's WRN: the BN output that follows each residual sum
        pairs = zip(pre_maps[1:], post_maps[1:], strict=True)
        assert all(not torch.allclose(a, b) for a, b in pairs)
    else:  # MobileNetV2: linear bottlenecks, preact is the same map
        assert kind in LINEAR_STAGES
        for a, b in zip(pre_maps, post_maps, strict=True):
            torch.testing.assert_close(a, b)


def test_torchvision_native_size() -> None:
    net = build_model("resnet18", 1000).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224), feats=True)
    assert out.logits.shape == (1, 1000) and out.embedding.shape == (1, 512)
    assert [tuple(f.shape[1:]) for f in out.feats.values()] == [
        (64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_cifar_stage_shapes() -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrn = build_model("wrn_40_2", 100).eval()(x, feats=True)
        vgg = build_model("vgg8", 100).eval()(x, feats=True)
        vgg64 = build_model("vgg8", 100).eval()(torch.randn(2, 3, 64, 64), feats=True)
    assert [tuple(f.shape[1:]) for f in wrn.feats.values()] == [
        (16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
    assert [tuple(f.shape[1:]) for f in vgg.feats.values()] == [
        (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
    assert tuple(vgg64.feats[4].shape[1:]) == (512, 4, 4)  # the pool after group 3 is used


def test_wrn_preact_updates_batchnorm_once() -> None:
    torch.manual_seed(0)
    a, b = build_model("wrn_16_1", 10), build_model("wrn_16_1", 10)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    a(x)
    b(x, feats=True, preact=True)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def _save(obj: object, path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_repdistiller_checkpoint_round_trip(tmp_path, legacy: bool) -> None:
    """RepDistiller's teacher checkpoints: ``{'epoch', 'model', 'accuracy', 'optimizer'}``,
    possibly in the pre-1.6 (non-zip) serialisation format."""
    torch.manual_seed(0)
    src = build_model("wrn_16_1", 100)
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    opt.step()
    src.eval()
    dst = build_model("wrn_16_1", 100).eval()
    ckpt = {"epoch": 240, "model": src.state_dict(), "accuracy": torch.tensor(73.2),
            "optimizer": opt.state_dict()}
    path = str(tmp_path / "ckpt_epoch_240.pth")
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    info = load_weights(dst, path)
    assert info == {"source": path, "path": path, "sha256": file_sha256(path)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x).logits, src(x).logits)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module_prefix"])
def test_checkpoint_formats(tmp_path, wrap: str) -> None:
    src, dst = build_model("resnet8", 10), build_model("resnet8", 10)
    state = src.state_dict()
    obj = {"raw": state, "state_dict": {"state_dict": state, "epoch": 3},
           "module_prefix": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    load_weights(dst, _save(obj, tmp_path / "w.pt"))
    torch.testing.assert_close(dst.state_dict(), state)


def test_mismatched_checkpoint_names_keys_and_path(tmp_path) -> None:
    path = _save({"model": build_model("wrn_40_1", 100).state_dict()}, tmp_path / "teacher.pth")
    with pytest.raises(ValueError) as err:
        load_weights(build_model("wrn_16_1", 100), path)
    msg = str(err.value)
    assert path in msg and "WideResNet" in msg
    assert "unexpected" in msg and "block1.layer.2.bn1.bias" in msg
    path = _save({"model": build_model("resnet8", 100).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"fc.weight \(100, 64\) in file vs \(10, 64\) in model"):
        load_weights(build_model("resnet8", 10), path)
    with pytest.raises(ValueError, match="missing"):
        load_weights(build_model("resnet8x4", 10), path)


def test_bad_checkpoint_contents(tmp_path) -> None:
    with pytest.raises(ValueError, match="found a dict with keys 'epoch'"):
        load_weights(build_model("resnet8", 10), _save({"epoch": 1}, tmp_path / "e.pt"))
    with pytest.raises(ValueError, match="tensors-only"):
        load_weights(build_model("resnet8", 10), _save({"model": {"a": object}}, tmp_path / "o.pt"))


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    path = str(tmp_path / "nowhere" / "ckpt.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/ckpt.pth"):
        load_weights(build_model("resnet8", 10), path)


def test_torchvision_weights_offline_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(RuntimeError) as err:
        load_weights(build_model("resnet18", 1000), "torchvision:IMAGENET1K_V1")
    msg = str(err.value)
    assert str(hub_checkpoint_path(url)) in msg and "resnet18-f37072fd.pth" in msg
    assert "local path" in msg and "name resolution" in msg


def test_torchvision_weights_load_through_the_hub(monkeypatch) -> None:
    state = torchvision.models.mobilenet_v2(num_classes=1000).state_dict()
    seen = {}

    def cached(url, **kwargs):
        seen["url"], seen["dir"] = url, kwargs["model_dir"]
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    net = build_model("mobilenet_v2", 1000)
    info = load_weights(net, "torchvision:IMAGENET1K_V2")
    assert seen["url"] == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2.url
    assert info["source"] == "torchvision:IMAGENET1K_V2" and info["path"].startswith(seen["dir"])
    torch.testing.assert_close(net.state_dict(), state)


def test_torchvision_weights_wrong_enum_or_net() -> None:
    with pytest.raises(ValueError, match="expected one of IMAGENET1K_V1, IMAGENET1K_V2"):
        load_weights(build_model("resnet50", 1000), "torchvision:IMAGENET_V9")
    with pytest.raises(ValueError, match="needs a torchvision net"):
        load_weights(build_model("resnet20", 100), "torchvision:IMAGENET1K_V1")


def test_file_sha256_streams(tmp_path) -> None:
    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob", chunk=999) == hashlib.sha256(data).hexdigest()
