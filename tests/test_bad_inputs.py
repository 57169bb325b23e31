"""Bad configs and --set values, table-driven: each is refused before any work starts with a
message naming the file (or --set), the key, the value and what is allowed.

Most cases go through ``load_run_config`` (what every launcher calls first); the ones found
while the run is built (data, weights) through ``launch/train.py``'s ``main`` in this process;
a handful through ``launch/train.py`` as a subprocess (exit 2, no traceback).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from tests.awkward_files import make_awkward_folder, run_config
from tests.conftest import ROOT, run_env, train_cmd

KD, IPWD, CID = "configs/demo/kd.yaml", "configs/demo/ipwd.yaml", "configs/demo/cid.yaml"
VANILLA, IMAGENET = "configs/demo/vanilla.yaml", "configs/imagenet/r34_r18_cid.yaml"

# (config, --set values, the message's start, fragments it must hold)
CASES = [
    (KD, ["optim.lr=-0.1"], "--set: optim.lr: expected a learning rate > 0, found -0.1", []),
    (KD, ["optim.lr=0"], "--set: optim.lr: expected a learning rate > 0, found 0.0", []),
    (KD, ["optim.lr=.inf"], "--set: optim.lr: expected a learning rate > 0, found inf", []),
    (KD, ["optim.weight_decay=-1"], "--set: optim.weight_decay: expected a value >= 0, found -1.0",
     []),
    (KD, ["optim.momentum=1.5"], "--set: optim.momentum: expected a momentum in [0, 1), found 1.5",
     []),
    (KD, ["optim.momentum=-0.1"], "--set: optim.momentum: expected a momentum in [0, 1)", []),
    (KD, ["optim.epochs=0"], "--set: optim.epochs: expected a value >= 1, found 0", []),
    (KD, ["optim.gamma=0"], "--set: optim.gamma: expected a decay factor in (0, 1], found 0.0",
     []),
    (KD, ["optim.warmup_epochs=9"], "--set: optim.warmup_epochs: expected a value in [0, "
     "optim.epochs = 8), found 9.0", []),
    (KD, ["optim.grad_accum=0"], "--set: optim.grad_accum: expected a value >= 1, found 0", []),
    (KD, ["optim.clip_grad_norm=-1"], "--set: optim.clip_grad_norm: expected 0 (no clipping) or "
     "a norm > 0, found -1.0", []),
    (KD, ["optim.milestones=[0,5]"], "--set: optim.milestones[0]: expected a value >= 1, found 0",
     []),
    (KD, ["optim.milestones=[6,3]"], "--set: optim.milestones: expected increasing epochs", []),
    (KD, ["optim.lr=fast"], "--set: optim.lr: expected float, found str ('fast')", []),
    (KD, ["method.T=0"], "--set: method.T: expected a temperature > 0, found 0.0", []),
    (KD, ["method.T=-4"], "--set: method.T: expected a temperature > 0, found -4.0", []),
    (KD, ["method.T=.nan"], "--set: method.T: expected a temperature > 0, found nan", []),
    (KD, ["method.kd_weight=-1"], "--set: method.kd_weight: expected a weight >= 0, found -1.0",
     []),
    (KD, ["method.ce_weight=.inf"], "--set: method.ce_weight: expected a weight >= 0, found inf",
     []),
    (KD, ["method.temperature=4"], "--set: unknown key 'method.temperature'",
     ["valid keys in 'method': T, ce_weight, kd_weight"]),
    (IPWD, ["method.w_max=0.5"], "--set: method.w_max: expected a clip value (the mean weight is "
     "1) >= 1, found 0.5", []),
    (CID, ["method.alpha=-1"], "--set: method.alpha: expected a weight >= 0, found -1.0", []),
    (VANILLA, ["method.label_smoothing=1.5"], "--set: method.label_smoothing: expected a value "
     "in [0, 1), found 1.5", []),
    (KD, ["method.name=kdd"], "--set: method.name: unknown method 'kdd'; did you mean 'kd'?", []),
    (KD, ["data.batch_size=0"], "--set: data.batch_size: expected a value >= 1, found 0", []),
    (KD, ["data.eval_batch_size=-2"], "--set: data.eval_batch_size: expected a value >= 1", []),
    (KD, ["data.workers=-1"], "--set: data.workers: expected a value >= 0, found -1", []),
    (KD, ["data.views=-1"], "--set: data.views: expected a value >= 0, found -1", []),
    (KD, ["data.image_size=64"], "--set: data.image_size: expected 32 with data.augment 'cifar'",
     ["found 64"]),
    (KD, ["data.eval_resize=10"], "--set: data.eval_resize: expected 0 (no resize) or a size >= "
     "data.image_size = 32, found 10", []),
    (IMAGENET, ["data.rrc_scale=[0.5,0.2]"], "--set: data.rrc_scale: expected [low, high] with "
     "0 < low and high <= 1.0 and low <= high, found [0.5, 0.2]", []),
    (IMAGENET, ["data.rrc_ratio=[0,1]"], "--set: data.rrc_ratio: expected [low, high] with 0 < "
     "low and low <= high, found [0.0, 1.0]", []),
    (KD, ["data.std=[0.2,0,0.2]"], "--set: data.std[1]: expected a value > 0, found 0.0", []),
    (KD, ["data.mean=[0.5,0.5]"], "--set: data.mean: expected 3 values (one per RGB channel), "
     "found 2", []),
    (KD, ["data.num_classes=1"], "--set: data.num_classes: expected 0 (from the dataset) or a "
     "count >= 2, found 1", []),
    (KD, ["data.augment=crop"], "--set: data.augment: expected one of 'cifar', 'tiny_imagenet', "
     "'imagenet', 'none', found str ('crop')", []),
    (KD, ["seed=-1"], "--set: seed: expected an integer in [0, 4294967295], found -1", []),
    (KD, ["train.eval_every=0"], "--set: train.eval_every: expected a value >= 1, found 0", []),
    (KD, ["train.log_every_steps=0"], "--set: train.log_every_steps: expected a value >= 1", []),
    (KD, ["train.dist_timeout_s=0"], "--set: train.dist_timeout_s: expected a value >= 1", []),
    (KD, ["model.arch=resnet2O"], "--set: model.arch: unknown network 'resnet2O'; did you mean",
     ["timm:<name>"]),
    (KD, ["teacher.arch=wrn_40_3"], "--set: teacher.arch: unknown network 'wrn_40_3'; did you "
     "mean", []),
    (KD, ["teacher.arch=timm:resnet10x"], "--set: teacher.arch: unknown timm model 'resnet10x'; "
     "did you mean 'timm:resnet10t'", []),
    (KD, ["teacher.cache_topk=-1"], "--set: teacher.cache_topk: expected a value >= 0, found -1",
     []),
    (KD, ["teacher.cache_chunk=0"], "--set: teacher.cache_chunk: expected a value >= 1, found 0",
     []),
    (KD, ["teacher.source=cached"], "--set: teacher.source: 'cached' needs data.views = the K >= "
     "1 views of the cache", ["found data.views = 0"]),
    (KD, ["optim.momentum"], "--set: expected dotted.key=value, found 'optim.momentum'", []),
]


@pytest.mark.parametrize(("cfg", "overrides", "start", "fragments"), CASES,
                         ids=[" ".join(c[1]) for c in CASES])
def test_bad_value_is_a_config_error(cfg: str, overrides: list[str], start: str,
                                     fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(ROOT / cfg, overrides, check_paths=False)
    message = str(info.value)
    assert message.startswith(start), message
    assert all(f in message for f in fragments), message


FILE_CASES = [
    ("optim: {momentum: 1.5}\n", "optim.momentum: expected a momentum in [0, 1), found 1.5"),
    ("method: {name: kd, T: -1}\n", "method.T: expected a temperature > 0, found -1.0"),
    ("optim: {weight_decay: -0.0001}\n", "optim.weight_decay: expected a value >= 0"),
]


@pytest.mark.parametrize(("text", "expected"), FILE_CASES)
def test_bad_value_in_a_file_names_that_file(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"base: {ROOT / KD}\n{text}")
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg, [], check_paths=False)
    assert str(info.value) == f"{cfg}: {expected}" or str(info.value).startswith(
        f"{cfg}: {expected}")


def test_missing_data_root_names_the_layout_and_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(ROOT / IMAGENET, ["data.root=/nonexistent/imagenet"])
    message = str(info.value)
    assert message.startswith("--set: data.root: directory not found: /nonexistent/imagenet; ")
    assert "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG" in message
    assert "--set data.root=" in message


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_awkward_folder(tmp_path_factory.mktemp("bad_inputs") / "data", good=2, val=1)
    torch.manual_seed(0)
    from pipeline.models import build_model

    torch.save({"model": build_model("resnet14", 3).state_dict()}, root.parent / "resnet14.pt")
    return root


BUILD_CASES = [
    # a teacher arch that does not fit its weights file: named before training
    (["method.name=kd", "teacher.arch=resnet20", "teacher.weights={weights}"],
     "teacher.weights: {weights} does not fit teacher.arch 'resnet20': first mismatch: "
     "layer1.2.conv1.weight (16, 16, 3, 3) is missing from the file", ["set teacher.arch"]),
    (["method.name=kd", "teacher.arch=resnet14", "teacher.weights={weights}",
      "data.num_classes=3", "model.weights={weights}", "model.arch=resnet8"],
     "model.weights: {weights} does not fit model.arch 'resnet8': first mismatch: "
     "layer1.1.conv1.weight", []),
    (["data.eval_splits=[test]"], "data.eval_splits: expected the 'test' split folder",
     ["holds: train, val"]),
    (["data.num_classes=5"], "data.num_classes: expected the dataset's class count, found 5", []),
]


@pytest.mark.parametrize(("overrides", "start", "fragments"), BUILD_CASES,
                         ids=["teacher-arch", "student-arch", "missing-split", "num-classes"])
def test_found_while_building_exits_2_without_a_traceback(
        awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        overrides: list[str], start: str, fragments: list[str]) -> None:
    from accelerate.state import AcceleratorState

    from launch.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    weights = str(awkward.parent / "resnet14.pt")
    cfg = run_config(tmp_path / "run.yaml", awkward)
    argv = ["--cfg", str(cfg), "--run-dir", str(tmp_path / "run")]
    for o in overrides:
        argv += ["--set", o.format(weights=weights)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: " + start.format(weights=weights)), err
    assert all(f in err for f in fragments), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_reports_what_a_real_run_would_stop_at(
        awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The dry run exits 2 for a contradiction with the files that are there, lists what it
    checked and what not."""
    from accelerate.state import AcceleratorState

    from launch.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    weights = str(awkward.parent / "resnet14.pt")
    cfg = run_config(tmp_path / "run.yaml", awkward)
    argv = ["--cfg", str(cfg), "--dry-run", "--set", "method.name=kd", "--set",
            "teacher.arch=resnet20", "--set", f"teacher.weights={weights}", "--set",
            "data.eval_splits=[val,test]", "--set", "data.num_classes=4"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "but 3 error(s) would stop the real run" in out
    assert "ERROR       data.eval_splits: " in out and "test not found" in out
    assert "ERROR       data.num_classes: 4 configured, the data at" in out
    assert "ERROR       teacher.weights: " in out and "does not fit teacher.arch 'resnet20'" in out
    assert "OK          data.train_split: " in out and "NOT CHECKED images: " in out


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "overrides", "start"), [
    (KD, ["optim.lr=-0.1"], "config error: --set: optim.lr: expected a learning rate > 0"),
    (KD, ["model.arch=resnet2O"], "config error: --set: model.arch: unknown network 'resnet2O'"),
    (IMAGENET, [], "config error: configs/_base/imagenet.yaml: data.root: directory not found"),
])
def test_launcher_exits_2_without_a_traceback(cfg: str, overrides: list[str], start: str) -> None:
    out = subprocess.run(train_cmd(cfg, *overrides), cwd=ROOT, env=run_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith(start), out.stderr
