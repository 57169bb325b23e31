"""VID + KD (trainable regressors and variances) under two gloo processes through accelerate:
the student and the method's modules agree on both ranks, and a run killed after an epoch
resumes to bit-identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, run_env, train_cmd

SETS = ("optim.epochs=3", "optim.milestones=[2]", "train.max_steps_per_epoch=4",
        "train.progress=false", "train.deterministic=true", "tracking.enabled=false",
        "data.eval_splits=[test_unbiased]")


def _launch(run_dir: Path, demo_root: Path, teacher: Path) -> list[str]:
    return [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0",
            *train_cmd("configs/demo/vid.yaml", f"data.root={demo_root}", "teacher.arch=resnet14",
                       f"teacher.weights={teacher}", *SETS, run_dir=run_dir)[1:]]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _kill_after_first_epoch(cmd: list[str], run_dir: Path) -> None:
    """Start a run in its own process group and SIGKILL the group once the checkpoint after
    the first epoch exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    if torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] >= 1:
                        break
                except (EOFError, RuntimeError):  # being replaced
                    pass
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_vid_two_processes_agree_and_resume_after_a_kill(demo_root: Path,
                                                         tmp_path: Path) -> None:
    from pipeline.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, teacher)
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"

    out = subprocess.run(_launch(ref_dir, demo_root, teacher), cwd=ROOT,
                         env=run_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    a, b = metrics["param_checksums"]
    assert a == b, "the students diverged"
    m0, m1 = metrics["method_state_checksums"]
    assert m0 == m1 and m0 != 0.0, "the regressors or variances differ between the processes"
    method = _state(ref_dir / "method.pt")
    assert any(k.startswith("terms.vid.log_scales.") for k in method)
    assert not any("vid" in k or "regressor" in k for k in _state(ref_dir / "student.pt"))
    initial = torch.log(torch.expm1(torch.tensor(5.0 - 1e-5)))
    assert not torch.allclose(method["terms.vid.log_scales.0"], initial), "variances not trained"

    _kill_after_first_epoch(_launch(cut_dir, demo_root, teacher), cut_dir)
    assert (cut_dir / "checkpoints" / "last.pt").exists()
    assert not (cut_dir / "student.pt").exists(), "the run was not cut mid-way"
    out = subprocess.run(_launch(cut_dir, demo_root, teacher), cwd=ROOT,
                         env=run_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    for name in ("student.pt", "method.pt"):
        ref, cut = _state(ref_dir / name), _state(cut_dir / name)
        assert ref.keys() == cut.keys()
        for k in ref:
            assert torch.equal(ref[k], cut[k]), f"{name}: {k}"
