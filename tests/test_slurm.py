"""Launch layer: accelerate configs, the node launcher's signal path, and a real single-node Slurm.

The Slurm test starts munged, slurmctld and slurmd in a temporary folder
(launch/slurm/local_cluster.sh), submits launch/slurm/train.sbatch with two CPU processes, signals
it with ``scancel --signal=USR1 --batch`` mid-run and checks that the job checkpointed, requeued
itself, resumed and ended with the same weights as an uninterrupted two-process run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, run_env, train_cmd

SCRIPTS = ["launch/slurm/local_cluster.sh", "launch/slurm/job.sh", "launch/slurm/train.sbatch",
           "launch/slurm/cache_teacher.sbatch", "launch/torchrun.sh", "tools/apt-packages.sh"]
ACCELERATE_CONFIGS = {"single_gpu.yaml": (1, 1), "multi_gpu.yaml": (8, 1),
                      "multi_node.yaml": (16, 2)}

# A worker that waits for SIGUSR1 and exits 75 like the trainer (no torch: starts fast).
FAKE_WORKER = """
import os, signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
out, rank = Path(sys.argv[1]), os.environ["RANK"]
(out / f"ready.{rank}").write_text(os.environ["WORLD_SIZE"])
deadline = time.time() + 120
while not got and time.time() < deadline:
    time.sleep(0.05)
(out / f"done.{rank}").write_text(str(len(got)))
sys.exit(75 if got else 3)
"""


def test_shell_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (tools/apt-packages.sh installs it)")
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch/accelerate" / name))
    assert (cfg.num_processes, cfg.num_machines) == ACCELERATE_CONFIGS[name]
    assert cfg.use_cpu is False and cfg.mixed_precision == "no"


def test_node_launch_exit_status() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_launch",
                                                  ROOT / "launch/slurm/node_launch.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.status_of([0, 0]) == 0
    assert mod.status_of([75, 75]) == 75
    assert mod.status_of([75, -15]) == 75  # the agent stops the slower rank once one has exited
    assert mod.status_of([1]) == 1 and mod.status_of([-9]) == 1


def test_node_launch_forwards_usr1_and_keeps_status_75(tmp_path: Path) -> None:
    """SIGUSR1 to the launcher alone reaches both accelerate workers; 75 comes back out."""
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    cmd = [PY, str(ROOT / "launch/slurm/node_launch.py"), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(worker), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert (tmp_path / "ready.0").read_text() == "2"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-3000:]
    for r in (0, 1):
        assert int((tmp_path / f"done.{r}").read_text()) >= 1, f"rank {r} never saw SIGUSR1"


# -- a real single-node Slurm ---------------------------------------------------------------------


def _slurm_missing() -> str | None:
    for binary in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel"):
        if shutil.which(binary) is None:
            return f"{binary} not installed (tools/apt-packages.sh installs Slurm and munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private single-node cluster; yields the environment that points Slurm commands at it."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "launch/slurm/local_cluster.sh")
    env = run_env(SLURM_CONF=str(folder / "slurm.conf"), PYTHON=PY)
    try:
        out = subprocess.run([script, "start", str(folder)], env=env, capture_output=True,
                             text=True, timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        yield env
    finally:
        subprocess.run([script, "stop", str(folder)], env=env, capture_output=True, timeout=120)


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _node_idle(env: dict[str, str]) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().startswith("idle")


def _wait_for(pred, timeout: float, what: str, log: Path) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.5)
    text = log.read_text() if log.exists() else "(no job log)"
    raise AssertionError(f"timed out waiting for {what}; job log:\n{text[-4000:]}")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, path)
    return path


@pytest.mark.slow
def test_sbatch_usr1_checkpoints_requeues_and_resumes_exactly(
    slurm: dict[str, str], demo_root: Path, teacher_ckpt: Path, tmp_path: Path
) -> None:
    cfg = "configs/demo/kd.yaml"
    sets = (f"data.root={demo_root}", "teacher.arch=resnet8", f"teacher.weights={teacher_ckpt}",
            "optim.epochs=2", "optim.milestones=[1]", "train.max_steps_per_epoch=20",
            "data.eval_splits=[test_unbiased]", "train.progress=false",
            "train.deterministic=true", "tracking.enabled=false")
    ref_dir, job_dir, log = tmp_path / "ref", tmp_path / "job", tmp_path / "job.log"

    # The uninterrupted reference: the same two gloo processes, outside Slurm.
    ref = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", *train_cmd(cfg, *sets, run_dir=ref_dir)[1:]]
    out = subprocess.run(ref, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    args = [a for s in sets for a in ("--set", s)]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={log}", f"--chdir={ROOT}",
         "--export=ALL", str(ROOT / "launch/slurm/train.sbatch"), cfg, *args,
         "--run-dir", str(job_dir)],
        cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        _wait_for(lambda: log.exists() and "epoch 1/2" in log.read_text(), 240,
                  "the end of epoch 1", log)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True,
                       timeout=30)
        _wait_for(lambda: _job(slurm, job_id).get("Restarts") == "1", 240, "the requeue", log)
        # Slurm holds a requeued batch job for ~2 minutes (BeginTime). Release it early, but only
        # once the node is idle and a few seconds later: slurmd refuses a launch credential made
        # in the same second as the one it revoked when the first run ended.
        _wait_for(lambda: _job(slurm, job_id).get("JobState") == "PENDING" and _node_idle(slurm),
                  120, "the first run to leave the node", log)
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                       env=slurm, timeout=30)
        _wait_for(lambda: _job(slurm, job_id).get("JobState") in ("COMPLETED", "FAILED",
                                                                  "CANCELLED", "TIMEOUT"),
                  300, "the resumed job to end", log)
    finally:
        if _job(slurm, job_id).get("JobState") in ("RUNNING", "PENDING"):
            subprocess.run(["scancel", job_id], env=slurm, timeout=30)

    info, text = _job(slurm, job_id), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1" and info["Requeue"] == "1"
    assert "2 CPU process(es)" in text
    assert "stopped by signal at epoch 2" in text, text[-4000:]  # checkpointed mid-epoch 2
    assert "requeueing job" in text and "restart 1:" in text
    assert "resuming" in text
    ref_w = torch.load(ref_dir / "student.pt", weights_only=True)
    job_w = torch.load(job_dir / "student.pt", weights_only=True)
    assert ref_w.keys() == job_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], job_w[k]), k
