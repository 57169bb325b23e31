"""One of two gloo processes dies or hangs: the other must fail within a bounded time, not hang.

A killed peer surfaces on gloo as "Connection closed by peer" at the next collective; a frozen one
(SIGSTOP: alive, silent) only through the process-group timeout, ``train.dist_timeout_s``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, run_env, train_cmd

# Long enough that the run is still training when a process is killed.
SETS = ("optim.epochs=50", "train.eval_every=1000", "train.checkpoint_every_steps=2",
        "train.progress=false", "tracking.enabled=false", "data.eval_splits=[test_unbiased]")
LIMIT_S = 120  # the other process must be gone this long after the failure


def _args(demo_root: Path, *extra: str) -> tuple[str, ...]:
    return (f"data.root={demo_root}", *SETS, *extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return item.split(b"=", 1)[1].decode()
    return None


def _wait_training(run_dir: Path, procs: list[subprocess.Popen]) -> None:
    """Until the first mid-epoch checkpoint exists (training is under way)."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.exists():
        if any(p.poll() is not None for p in procs):
            out = procs[0].communicate()[0] if procs[0].stdout else ""
            raise AssertionError(f"ended before training: {[p.poll() for p in procs]}\n{out}")
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint within 240 s"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkill_of_rank1_fails_the_launcher(demo_root: Path, tmp_path: Path) -> None:
    """accelerate launch, 2 CPU processes: SIGKILL rank 1; rank 0 and the launcher exit non-zero."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0",
           *train_cmd("configs/demo/vanilla.yaml", *_args(demo_root), run_dir=run_dir)[1:]]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_training(run_dir, [launcher])
        ranks = {_local_rank(pid): pid for pid in _children(launcher.pid)}
        assert {"0", "1"} <= set(ranks), f"workers not found: {ranks}"
        os.kill(ranks["1"], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=LIMIT_S)  # raises if it hangs
    finally:
        _stop([launcher])
    assert launcher.returncode != 0, out[-3000:]
    assert not Path(f"/proc/{ranks['0']}").exists(), "rank 0 outlived the launcher"
    assert not (run_dir / "student.pt").exists()


def test_frozen_rank1_times_out_rank0(demo_root: Path, tmp_path: Path) -> None:
    """Two processes without a launcher: SIGSTOP rank 1; rank 0 fails after dist_timeout_s."""
    timeout_s = 20
    run_dir = tmp_path / "run"
    port = str(_free_port())
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in (0, 1):
            env = run_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
            log = (tmp_path / f"rank{rank}.log").open("w")
            logs.append(log)
            cmd = train_cmd("configs/demo/vanilla.yaml",
                            *_args(demo_root, f"train.dist_timeout_s={timeout_s}"),
                            run_dir=run_dir)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        _wait_training(run_dir, procs)
        procs[1].send_signal(signal.SIGSTOP)
        try:
            procs[0].wait(timeout=timeout_s + LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {timeout_s + LIMIT_S} s after rank 1 froze")
    finally:
        if procs and procs[-1].poll() is None:
            procs[-1].send_signal(signal.SIGCONT)
        _stop(procs)
        for log in logs:
            log.close()
    text = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode != 0, text[-3000:]
    # gloo says "Timed out waiting 20000ms for recv ..." or "Application timeout caused pair
    # closure", depending on where rank 0 was waiting.
    assert re.search(r"(?i)timed out|timeout", text), text[-3000:]
