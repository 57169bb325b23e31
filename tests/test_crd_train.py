"""CRD through launch/train.py: two gloo processes end with the same banks, and a run killed
mid-epoch resumes to bit-identical weights, heads and banks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, run_env, train_cmd

CFG = "configs/demo/crd.yaml"
SMALL = ("optim.epochs=2", "optim.milestones=[1]", "train.max_steps_per_epoch=5",
         "train.progress=false", "train.deterministic=true", "tracking.enabled=false",
         "data.eval_splits=[test_unbiased]")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, path)
    return path


def _args(demo_root: Path, teacher: Path) -> tuple[str, ...]:
    return (f"data.root={demo_root}", "teacher.arch=resnet14", f"teacher.weights={teacher}", *SMALL)


@pytest.mark.slow
def test_two_processes_keep_equal_banks(demo_root: Path, teacher_ckpt: Path,
                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(CFG, *_args(demo_root, teacher_ckpt), "optim.epochs=1",
                      run_dir=run_dir)[1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["param_checksums"])) == 1
    a, b = metrics["method_state_checksums"]
    assert a == b and a != 0.0, "the memory banks differ between the processes"
    state = torch.load(run_dir / "method.pt", weights_only=True)
    assert int(state["terms.crd.memory.steps"]) == 5  # one update per global step
    assert (state["terms.crd.memory.z"] > 0).all()


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(demo_root: Path, teacher_ckpt: Path,
                                               tmp_path: Path) -> None:
    args = (*_args(demo_root, teacher_ckpt), "train.checkpoint_every_steps=2")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(train_cmd(CFG, *args, run_dir=ref_dir), cwd=ROOT, env=run_env(), check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(train_cmd(CFG, *args, run_dir=cut_dir), cwd=ROOT, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                state = torch.load(ckpt, map_location="cpu", weights_only=False)
            except (EOFError, RuntimeError):  # caught mid-rename: try again
                state = {"epoch": 0, "step": 0}
            if (state["epoch"], state["step"]) >= (1, 2):  # mid-way through the second epoch
                break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (cut_dir / "student.pt").exists(), "the run was not cut mid-way"
    cut_state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    assert int(cut_state["method.terms.crd.memory.steps"]) >= 7  # the banks are in last.pt
    out = subprocess.run(train_cmd(CFG, *args, run_dir=cut_dir), cwd=ROOT, env=run_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    for name in ("student.pt", "method.pt"):
        ref = torch.load(ref_dir / name, weights_only=True)
        cut = torch.load(cut_dir / name, weights_only=True)
        assert ref.keys() == cut.keys()
        for k in ref:
            assert torch.equal(ref[k], cut[k]), f"{name}: {k}"
