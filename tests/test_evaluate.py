"""launch/evaluate.py: a finished run's last-epoch metrics reproduced exactly, with the network's
head and with a method's own head (CID), as an MLflow run of its own linked to the training run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, run_env, train_cmd

# Two short epochs, evaluated at the end only (the metrics evaluate.py must reproduce).
SMALL = ("optim.epochs=2", "optim.milestones=[1]", "train.max_steps_per_epoch=4",
         "train.eval_every=2", "train.progress=false", "train.deterministic=true")


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "launch/evaluate.py"), *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)


def _train(cfg: str, run_dir: Path, *overrides: str) -> dict:
    subprocess.run(train_cmd(cfg, *overrides, run_dir=run_dir), cwd=ROOT, env=run_env(),
                   check=True, capture_output=True, timeout=300)
    return json.loads((run_dir / "metrics.json").read_text())


def _assert_same_as_last_epoch(result: dict, metrics: dict, splits: list[str]) -> None:
    last = metrics["last"]
    assert set(result["splits"]) == set(splits)
    for split in splits:
        ours = result["splits"][split]
        theirs = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{split}/")}
        assert set(ours) == set(theirs), split
        for name, value in ours.items():
            assert value == theirs[name], f"{split}/{name}: {value} != {theirs[name]}"


@pytest.fixture(scope="module")
def finished(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short demo run (resnet8 trained with CE), tracked in an MLflow store of its own."""
    root = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    run_dir = root / "run"
    metrics = _train("configs/demo/teacher.yaml", run_dir, f"data.root={demo_root}",
                     "model.arch=resnet8", *SMALL, f"tracking.uri={uri}",
                     f"tracking.artifact_dir={root / 'art'}")
    return {"run_dir": run_dir, "metrics": metrics, "uri": uri}


def test_evaluate_reproduces_a_finished_run(finished: dict) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = finished["run_dir"]
    out = _evaluate("--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "evaluations" / "resnet8-student.json").read_text())
    assert result["head"] == "network" and result["num_samples"]["test_biased"] == 1000
    _assert_same_as_last_epoch(result, finished["metrics"], ["test_unbiased", "test_biased"])

    client = MlflowClient(tracking_uri=finished["uri"])
    train_id = json.loads((run_dir / "run_info.json").read_text())["mlflow_run_id"]
    assert result["evaluated_run_id"] == train_id
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_id != train_id
    assert run.data.tags["run_kind"] == "evaluation"
    assert run.data.tags["evaluated_run_id"] == train_id
    assert run.data.tags["weights_sha256"] == result["weights"]["sha256"]
    for key in ("test_unbiased/top1", "test_biased/ece", "test_biased/aurc", "test_biased/nll"):
        split, name = key.split("/")
        assert run.data.metrics[key] == result["splits"][split][name]
    assert "resnet8-student.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_evaluate_any_split_in_two_processes(finished: dict, tmp_path: Path) -> None:
    """The training split, split over two gloo processes, equals one process's scores."""
    run_dir = finished["run_dir"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["--cfg", str(run_dir / "config.yaml"), "--weights", str(run_dir / "student.pt"),
              "--split", "train", "--no-tracking"]
    out = _evaluate(*common, "--out", str(one))
    assert out.returncode == 0, out.stderr[-3000:]
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "launch/evaluate.py"), *common, "--out", str(two)]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["num_samples"] == {"train": 4000} and a.get("mlflow_run_id") is None
    assert a["world_size"] == 1 and b["world_size"] == 2
    # each sample once: counts are exact; the logits of a sample may differ in the last bits
    # between batch compositions (another oneDNN kernel), so the averages agree to 1e-6
    assert a["splits"]["train"]["top1"] == b["splits"]["train"]["top1"]
    for name, value in a["splits"]["train"].items():
        assert b["splits"]["train"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_evaluate_uses_the_method_head_of_a_cid_run(demo_root: Path, tmp_path: Path) -> None:
    from pipeline.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, teacher)
    run_dir = tmp_path / "cid"
    # 2 epochs: epoch 1 warms up, epoch 2 trains and evaluates with the interventional classifier
    metrics = _train("configs/demo/cid.yaml", run_dir, f"data.root={demo_root}",
                     "teacher.arch=resnet14", f"teacher.weights={teacher}", *SMALL,
                     "tracking.enabled=false", "method.prior_factor=frequency",
                     "data.train_fraction=0.5", "data.eval_splits=[test_unbiased]")
    assert (run_dir / "method.pt").is_file()
    out = _evaluate("--run-dir", str(run_dir), "--split", "test_unbiased")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "evaluations" / "resnet8-student.json").read_text())
    assert result["head"] == "method" and result["weights"]["method_state"].endswith("method.pt")
    _assert_same_as_last_epoch(result, metrics, ["test_unbiased"])
    # the student's own classifier (trained by the KL term only) scores differently
    own = tmp_path / "own.json"
    out = _evaluate("--run-dir", str(run_dir), "--split", "test_unbiased", "--head", "network",
                    "--out", str(own))
    assert out.returncode == 0, out.stderr[-3000:]
    network = json.loads(own.read_text())
    assert network["head"] == "network"
    assert network["splits"]["test_unbiased"]["nll"] != result["splits"]["test_unbiased"]["nll"]
    # the teacher of the same config, from teacher.weights (a bare checkpoint: no training run)
    t_out = tmp_path / "teacher.json"
    out = _evaluate("--run-dir", str(run_dir), "--net", "teacher", "--split", "test_biased",
                    "--out", str(t_out))
    assert out.returncode == 0, out.stderr[-3000:]
    scored = json.loads(t_out.read_text())
    assert scored["arch"] == "resnet14" and scored["evaluated_run_id"] is None


def test_evaluate_errors_name_what_is_missing(demo_root: Path, tmp_path: Path) -> None:
    out = _evaluate("--run-dir", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "expected config.yaml" in out.stderr
    absent = tmp_path / "absent.pt"
    out = _evaluate("--cfg", str(ROOT / "configs/demo/teacher.yaml"), "--weights", str(absent),
                    "--set", f"data.root={demo_root}")
    assert out.returncode == 2 and f"expected a checkpoint file at '{absent}'" in out.stderr
    out = _evaluate("--cfg", str(ROOT / "configs/demo/teacher.yaml"), "--net", "teacher")
    assert out.returncode == 2 and "no teacher.arch" in out.stderr
