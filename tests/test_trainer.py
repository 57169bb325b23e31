"""The training loop end to end on the bundled data: processes, resume, tracking, dry runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, run_env, train_cmd

SMALL = ("optim.epochs=2", "optim.milestones=[1]", "train.max_steps_per_epoch=5",
         "train.progress=false", "train.deterministic=true", "tracking.enabled=false")


def _data(demo_root: Path) -> tuple[str, ...]:
    return (f"data.root={demo_root}",)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed (random) resnet14 teacher checkpoint in RepDistiller's {'model': ...} format."""
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, path)
    return path


def _kd(demo_root: Path, teacher_ckpt: Path) -> tuple[str, ...]:
    return (*_data(demo_root), "teacher.arch=resnet14", f"teacher.weights={teacher_ckpt}", *SMALL)


def test_two_processes_gloo(demo_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd("configs/demo/kd.yaml", *_kd(demo_root, teacher_ckpt), run_dir=run_dir)[1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    a, b = metrics["param_checksums"]
    assert a == b, "the two replicas diverged"


def test_cid_two_processes_share_centres(demo_root: Path, teacher_ckpt: Path,
                                         tmp_path: Path) -> None:
    """CID under two gloo processes: centres summed across processes agree on both ranks."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd("configs/demo/cid.yaml", *_kd(demo_root, teacher_ckpt),
                      "optim.epochs=3", "method.warmup_epochs=1", run_dir=run_dir)[1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert len(set(metrics["param_checksums"])) == 1
    a, b = metrics["method_state_checksums"]
    assert a == b and a != 0.0, "the class centres differ between the processes"


def test_coss_two_processes(demo_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    """CoSS never uses the student's classifier: DDP must not wait for its gradient."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd("configs/demo/coss.yaml", *_kd(demo_root, teacher_ckpt), "data.coss_k=0",
                      "optim.epochs=1", run_dir=run_dir)[1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["param_checksums"])) == 1


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student.pt", weights_only=True)


def test_resume_after_sigkill_matches_uninterrupted(demo_root: Path, teacher_ckpt: Path,
                                                    tmp_path: Path) -> None:
    args = _kd(demo_root, teacher_ckpt)
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(train_cmd("configs/demo/kd.yaml", *args, run_dir=ref_dir), cwd=ROOT,
                   env=run_env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(train_cmd("configs/demo/kd.yaml", *args, run_dir=cut_dir), cwd=ROOT,
                            env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state["epoch"] >= 1:
                break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (cut_dir / "student.pt").exists(), "the run was not cut mid-way"

    out = subprocess.run(train_cmd("configs/demo/kd.yaml", *args, run_dir=cut_dir), cwd=ROOT,
                         env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    ref, cut = _weights(ref_dir), _weights(cut_dir)
    assert ref.keys() == cut.keys()
    for k in ref:
        assert torch.equal(ref[k], cut[k]), k


def test_mid_epoch_checkpoint_resume(demo_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    """A run stopped by SIGUSR1 mid-epoch checkpoints, exits 75, and resumes to the same weights."""
    args = (*_kd(demo_root, teacher_ckpt), "train.max_steps_per_epoch=40")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(train_cmd("configs/demo/kd.yaml", *args, run_dir=ref_dir), cwd=ROOT,
                   env=run_env(), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(train_cmd("configs/demo/kd.yaml", *args, run_dir=cut_dir), cwd=ROOT,
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # the first epoch's end is printed; signal in the second
        if line.startswith("epoch 1/"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGUSR1)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 75
    state = torch.load(cut_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step"] < 40
    subprocess.run(train_cmd("configs/demo/kd.yaml", *args, run_dir=cut_dir), cwd=ROOT,
                   env=run_env(), check=True, capture_output=True, timeout=300)
    ref, cut = _weights(ref_dir), _weights(cut_dir)
    for k in ref:
        assert torch.equal(ref[k], cut[k]), k


def test_mlflow_receives_params_metrics_tags(demo_root: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    common = (*_data(demo_root), *[s for s in SMALL if not s.startswith("tracking")],
              f"tracking.uri={uri}", f"tracking.artifact_dir={tmp_path / 'art'}")
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "student"
    subprocess.run(train_cmd("configs/demo/teacher.yaml", *common, "model.arch=resnet8",
                             run_dir=t_dir), cwd=ROOT, env=run_env(), check=True,
                   capture_output=True, timeout=300)
    subprocess.run(train_cmd("configs/demo/kd.yaml", *common, "teacher.arch=resnet8",
                             f"teacher.weights={t_dir / 'student.pt'}", run_dir=s_dir),
                   cwd=ROOT, env=run_env(), check=True, capture_output=True, timeout=300)
    client = MlflowClient(tracking_uri=uri)
    t_id = json.loads((t_dir / "run_info.json").read_text())["mlflow_run_id"]
    s_id = json.loads((s_dir / "run_info.json").read_text())["mlflow_run_id"]
    run = client.get_run(s_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "64"
    assert run.data.params["method.name"] == "kd"
    assert run.data.params["optim.epochs"] == "2"
    for key in ("train/loss", "train/kd", "train/ce", "test_unbiased/top1", "test_biased/ece",
                "test_unbiased/aurc", "lr"):
        assert key in run.data.metrics, key
    tags = run.data.tags
    assert tags["method"] == "kd" and tags["teacher_run_id"] == t_id
    assert len(tags["dataset_fingerprint"]) >= 16 and "git_commit" in tags
    history = client.get_metric_history(s_id, "test_unbiased/top1")
    assert [m.step for m in history] == [5, 10]
    artifacts = {a.path for a in client.list_artifacts(s_id)}
    assert {"config.yaml", "metrics.json"} <= artifacts


@pytest.mark.slow
def test_end_to_end_teacher_then_kd(demo_root: Path, tmp_path: Path) -> None:
    """Bundled data: train a teacher, distil a student from it; both learn far above chance."""
    base = (*_data(demo_root), "optim.epochs=3", "optim.milestones=[2]",
            "train.progress=false", "tracking.enabled=false")
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "kd"
    subprocess.run(train_cmd("configs/demo/teacher.yaml", *base, run_dir=t_dir), cwd=ROOT,
                   env=run_env(), check=True, capture_output=True, timeout=600)
    subprocess.run(train_cmd("configs/demo/kd.yaml", *base,
                             f"teacher.weights={t_dir / 'student.pt'}", run_dir=s_dir),
                   cwd=ROOT, env=run_env(), check=True, capture_output=True, timeout=600)
    teacher = json.loads((t_dir / "metrics.json").read_text())
    student = json.loads((s_dir / "metrics.json").read_text())
    assert teacher["last"]["test_biased/top1"] > 80
    assert student["last"]["test_biased/top1"] > 50
    shutil.rmtree(t_dir / "checkpoints")
