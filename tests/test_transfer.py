"""Transfer: a frozen backbone loaded without its classifier and probed on another dataset
(launch/probe.py --target-cfg), on small fixtures in the published STL-10 and Tiny-ImageNet
formats and on a 2-class ImageFolder of scikit-learn digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT

FAST = ["--epochs", "3", "--knn-k", "3", "--cpu", "--no-tracking"]


@pytest.mark.parametrize(("arch", "head"), [
    ("resnet8", {"fc.weight", "fc.bias"}),
    ("wrn_16_2", {"fc.weight", "fc.bias"}),
    ("vgg8", {"classifier.weight", "classifier.bias"}),
    ("mobilenetv2", {"classifier.0.weight", "classifier.0.bias"}),
    ("shufflev2", {"linear.weight", "linear.bias"}),
])
def test_head_keys_are_the_class_count_dependent_keys(arch: str, head: set[str]) -> None:
    from pipeline.models.backbone import head_keys

    assert head_keys(arch) == head


def _student(path: Path, arch: str = "resnet8", classes: int = 10) -> dict[str, torch.Tensor]:
    """A 10-class student checkpoint whose classifier is unmistakable (every value 7)."""
    from pipeline.models import build_model

    torch.manual_seed(0)
    net = build_model(arch, classes)
    with torch.no_grad():
        net.fc.weight.fill_(7.0)
        net.fc.bias.fill_(7.0)
    state = net.state_dict()
    torch.save(state, path)
    return state


def test_backbone_loads_everything_but_the_classifier(tmp_path: Path) -> None:
    from pipeline.models import build_model
    from pipeline.models.backbone import load_backbone

    state = _student(tmp_path / "student.pt")
    torch.manual_seed(1)
    net = build_model("resnet8", 2)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    info = load_backbone(net, "resnet8", str(tmp_path / "student.pt"))
    assert info["dropped"] == ["fc.bias", "fc.weight"] == info["fresh"]
    assert info["loaded"] == len(state) - 2 and len(info["sha256"]) == 64
    got = net.state_dict()
    for k, v in got.items():
        if k.startswith("fc."):
            assert torch.equal(v, fresh[k]) and not (v == 7.0).any(), k
        else:
            assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match=r"does not fit resnet14 .*missing: layer1.1"):
        load_backbone(build_model("resnet14", 2), "resnet14", str(tmp_path / "student.pt"))


def _run_dir(tmp_path: Path) -> Path:
    """A 10-class demo student's run directory: the demo config and a student.pt."""
    from pipeline.catalog import load_run_config
    from pipeline.config import dump_config

    run = tmp_path / "run"
    run.mkdir()
    spec = load_run_config(ROOT / "configs/demo/vanilla.yaml", ["tracking.enabled=false"],
                           check_paths=False)
    (run / "config.yaml").write_text(dump_config(spec))
    _student(run / "student.pt", spec.model.arch)
    return run


def _digits_imagefolder(root: Path) -> None:
    """scikit-learn's 8×8 digits 0 and 1, as 32×32 RGB PNGs: train/ and val/ by class."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=2)
    for i, (img, label) in enumerate(zip(digits.images[:40], digits.target[:40], strict=True)):
        split = "train" if i < 28 else "val"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32))
        gray.convert("RGB").save(folder / f"{i}.png")


def test_probe_a_10_class_student_on_a_2_class_dataset(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from launch.probe import _build, main, parse_args

    run = _run_dir(tmp_path)
    _digits_imagefolder(tmp_path / "digits")
    target = tmp_path / "digits.yaml"
    target.write_text(f"base: {ROOT / 'configs/_base/demo.yaml'}\nname: digits2\n"
                      f"data: {{dataset: imagefolder, root: {tmp_path / 'digits'}, "
                      "eval_splits: [val], augment: none}\n")
    args = ["--run-dir", str(run), "--target-cfg", str(target), *FAST]
    built = _build(parse_args(args), run)
    assert built["num_classes"] == 2 and built["loaded"]["dropped"] == ["fc.bias", "fc.weight"]
    student = built["student"]
    assert student.fc.weight.shape == (2, 64) and not (student.fc.weight == 7.0).any()
    saved = torch.load(run / "student.pt", weights_only=True)
    assert torch.equal(student.conv1.weight, saved["conv1.weight"])

    assert main(args) == 0
    result = json.loads((run / "probe-digits2.json").read_text())
    assert result["target"]["num_classes"] == 2 and result["target"]["dataset"] == "imagefolder"
    assert result["num_train"] == 28 and result["weights"]["dropped"] == ["fc.bias", "fc.weight"]
    assert 0.0 <= result["probe"]["val"]["top1"] <= 100.0
    assert "classifier fc.bias, fc.weight not loaded" in capsys.readouterr().out
    assert not (run / "probe.json").exists(), "the run's own probe file is left alone"


def _stl10(root: Path) -> None:
    """STL-10 binaries as distributed: column-major 96×96 images, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")


def _tiny_imagenet(root: Path) -> None:
    """Tiny-ImageNet-200 as distributed (3 of its classes): wnids.txt, train/<wnid>/images/,
    val/images/ labelled by val_annotations.txt."""
    wnids = ["n01443537", "n01629819", "n01641577"]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(1)

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")

    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(4):
            jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        for i in range(2):
            name = f"val_{2 * c + i}.JPEG"
            jpeg(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("cfg", "writer", "split", "n_train", "classes"), [
    ("configs/transfer/stl10.yaml", _stl10, "test", 20, 10),
    ("configs/transfer/tiny_imagenet.yaml", _tiny_imagenet, "val", 12, 3),
])
def test_transfer_configs_on_published_format_fixtures(tmp_path: Path, cfg: str, writer,
                                                       split: str, n_train: int,
                                                       classes: int) -> None:
    from launch.probe import main

    run = _run_dir(tmp_path)
    writer(tmp_path / "data")
    assert main(["--run-dir", str(run), "--target-cfg", str(ROOT / cfg), "--target-set",
                 f"data.root={tmp_path / 'data'}", "--target-set", "data.workers=0", *FAST]) == 0
    name = "transfer-stl10" if "stl10" in cfg else "transfer-tiny-imagenet"
    result = json.loads((run / f"probe-{name}.json").read_text())
    assert result["target"]["num_classes"] == classes and result["num_train"] == n_train
    assert result["feature_dim"] == 64 and set(result["probe"]) == {split}
    assert 0.0 <= result["knn_k3"][split]["top1"] <= 100.0
