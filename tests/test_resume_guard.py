"""Resume safety: a changed config is refused with the differing keys, allowed with
train.allow_config_change and recorded as a new config version (files and MLflow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.train.resume_guard import check_resume, record_config
from tests.awkward_files import make_awkward_folder, run_config
from tests.conftest import ROOT, run_env, train_cmd

KD = ROOT / "configs/demo/kd.yaml"


class FakeTracker:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path).name, artifact_path))


def _spec(run_dir: Path, *overrides: str):
    return load_run_config(KD, [f"run_dir={run_dir}", *overrides], check_paths=False)


def _started(run_dir: Path, *overrides: str) -> None:
    """A run directory that was started with ``overrides`` and holds a checkpoint."""
    record_config(run_dir, check_resume(_spec(run_dir, *overrides), run_dir), (0, 0),
                  FakeTracker())
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"placeholder")


def test_same_config_and_free_keys_resume_as_the_same_version(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert check_resume(_spec(run_dir), run_dir).version == 1  # fresh
    _started(run_dir)
    plan = check_resume(_spec(run_dir, "tracking.experiment=other", "data.workers=4",
                              "train.progress=false", "train.log_every_steps=3"), run_dir)
    assert (plan.version, plan.new_version) == (1, False)
    relative = load_run_config(KD, ["run_dir=run"], check_paths=False)  # another spelling
    assert not check_resume(relative, run_dir).new_version


def test_changed_config_is_refused_then_recorded_with_the_override(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _started(run_dir)
    with pytest.raises(ConfigError) as info:
        check_resume(_spec(run_dir, "optim.lr=0.1", "optim.epochs=12"), run_dir)
    message = str(info.value)
    assert message.startswith("train.allow_config_change: resuming ")
    assert "optim.epochs: 8 -> 12; optim.lr: 0.05 -> 0.1" in message
    assert "--set train.allow_config_change=true" in message
    before = (run_dir / "config.yaml").read_text()
    spec = _spec(run_dir, "optim.lr=0.1", "optim.epochs=12", "train.allow_config_change=true")
    plan = check_resume(spec, run_dir)
    assert (plan.version, plan.changed) == (2, {"optim.epochs": (8, 12), "optim.lr": (0.05, 0.1)})
    assert (run_dir / "config.yaml").read_text() == before  # nothing written by the check
    tracker = FakeTracker()
    record_config(run_dir, plan, (8, 0), tracker)
    history = json.loads((run_dir / "config_versions" / "history.json").read_text())
    assert [h["version"] for h in history] == [1, 2]
    assert history[1]["from"] == {"epoch": 8, "step": 0}
    assert history[1]["changed"] == {"optim.epochs": [8, 12], "optim.lr": [0.05, 0.1]}
    v1 = yaml.safe_load((run_dir / "config_versions" / "v1.yaml").read_text())
    assert v1["optim"]["lr"] == 0.05  # what the first epochs used is kept
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.1
    assert tracker.tags["config_version"] == "2" and tracker.tags["config_v2/optim.lr"] == "0.1"
    assert ("v2.yaml", "config_versions") in tracker.artifacts
    # The next resume, without the override, continues version 2.
    plan = check_resume(_spec(run_dir, "optim.lr=0.1", "optim.epochs=12"), run_dir)
    assert (plan.version, plan.new_version) == (2, False)


@pytest.mark.parametrize("override", ["model.arch=resnet14", "method.name=vanilla",
                                      "teacher.arch=resnet32"])
def test_another_arch_or_method_is_refused_even_with_the_override(tmp_path: Path,
                                                                  override: str) -> None:
    run_dir = tmp_path / "run"
    _started(run_dir)
    with pytest.raises(ConfigError) as info:
        check_resume(_spec(run_dir, override, "train.allow_config_change=true"), run_dir)
    key = override.split("=")[0]
    assert str(info.value).startswith(f"{key}: the run directory ")
    assert "holds a checkpoint of another network or method" in str(info.value)


def test_trainer_refuses_before_building_anything(tmp_path: Path) -> None:
    """The check is the Trainer's first act: the placeholder checkpoint is never read, no data
    root is looked at (there is none) and no weights file is opened (there is none)."""
    from pipeline.train.trainer import Trainer

    run_dir = tmp_path / "run"
    _started(run_dir)
    with pytest.raises(ConfigError, match="^model.arch: the run directory"):
        Trainer(_spec(run_dir, "model.arch=resnet14"))


def test_a_run_directory_without_versions_counts_its_config_as_v1(tmp_path: Path) -> None:
    from pipeline.config import dump_config

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"placeholder")
    (run_dir / "config.yaml").write_text(dump_config(_spec(run_dir)))
    with pytest.raises(ConfigError, match="optim.lr: 0.05 -> 0.2"):
        check_resume(_spec(run_dir, "optim.lr=0.2"), run_dir)


@pytest.mark.slow
def test_rerun_of_a_finished_run_with_other_lr_and_epochs(tmp_path: Path) -> None:
    """launch/train.py end to end, with MLflow: refused (exit 2, no traceback, config.yaml
    untouched), then continued with the override and recorded as version 2."""
    from mlflow.tracking import MlflowClient

    root = make_awkward_folder(tmp_path / "data", good=4, val=1)
    cfg = run_config(tmp_path / "run.yaml", root)
    run_dir, db = tmp_path / "run", tmp_path / "mlruns.db"
    track = ("tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
             f"tracking.artifact_dir={tmp_path / 'artifacts'}")
    first = subprocess.run(train_cmd(str(cfg), *track, run_dir=run_dir), cwd=ROOT,
                           env=run_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    changed = (*track, "optim.lr=0.01", "optim.epochs=2")
    refused = subprocess.run(train_cmd(str(cfg), *changed, run_dir=run_dir), cwd=ROOT,
                             env=run_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "optim.epochs: 1 -> 2; optim.lr: 0.05 -> 0.01" in refused.stderr
    assert (run_dir / "config.yaml").read_text() == config
    allowed = subprocess.run(
        train_cmd(str(cfg), *changed, "train.allow_config_change=true", run_dir=run_dir),
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["last"]["epoch"] == 2
    assert (run_dir / "config_versions" / "v1.yaml").read_text() == config
    run_id = json.loads((run_dir / "run_info.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    tags = client.get_run(run_id).data.tags
    assert tags["config_version"] == "2" and tags["config_v2/optim.lr"] == "0.01"
    assert tags["config_v2/from"] == "epoch 2 step 0"
    artifacts = {a.path for a in client.list_artifacts(run_id, "config_versions")}
    assert artifacts == {"config_versions/v1.yaml", "config_versions/v2.yaml"}
