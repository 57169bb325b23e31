"""The bad-file report of an interrupted run (kill -9, SIGUSR1) equals an uninterrupted run's.

Six unreadable files in the training split (tests/awkward_files.py). The runs checkpoint every
step; each interrupted run is stopped after the checkpoint that follows the batch holding the
third unreadable file of the epoch, so half of them were met before the resume point: they
reach the final report only through the checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline.config.schema import DataSpec
from pipeline.data import build_index
from pipeline.data.loader import train_order
from tests.awkward_files import BAD, make_awkward_folder, run_config
from tests.conftest import ROOT, run_env, train_cmd

BATCH = 2


def _report(run_dir: Path) -> list[tuple[str, str, str]]:
    rows = json.loads((run_dir / "bad_samples.json").read_text())
    return sorted((r["split"], r["path"], r["error"]) for r in rows)


def _third_bad_step(root: Path) -> int:
    """The step counter after the batch that holds epoch 0's third unreadable file."""
    index = build_index(DataSpec(dataset="imagefolder", root=str(root)), "train")
    bad = {i for i in range(len(index)) if Path(index.path(i)).name in BAD}
    order = train_order(len(index), BATCH, 0, 0, 0, 1)
    steps = [s for s, row in enumerate(order.tolist()) for i in row if i in bad]
    assert len(steps) == len(BAD) and steps[2] + 1 < len(order)
    return steps[2] + 1


def _interrupt(cmd: list[str], run_dir: Path, at_step: int, sig: int) -> int:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state["epoch"] == 0 and state["step"] >= at_step:
                proc.send_signal(sig)
                break
        time.sleep(0.01)
    return proc.wait(timeout=240)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The awkward folder, its run config and the report of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("bad_resume")
    root = make_awkward_folder(tmp / "data")
    cfg = run_config(tmp / "run.yaml", root, batch_size=BATCH,
                     extra="  checkpoint_every_steps: 1\n")
    done = subprocess.run(train_cmd(str(cfg), run_dir=tmp / "ref"), cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _report(tmp / "ref")
    assert sorted(Path(p).name for _, p, _ in reference) == sorted(BAD)
    return cfg, reference


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1], ids=["kill-9", "sigusr1"])
def test_interrupted_run_reports_every_bad_file(uninterrupted: tuple[Path, list], tmp_path: Path,
                                                sig: int) -> None:
    cfg, reference = uninterrupted
    at_step = _third_bad_step(Path(cfg).parent / "data")
    cut_dir = tmp_path / "cut"
    rc = _interrupt(train_cmd(str(cfg), run_dir=cut_dir), cut_dir, at_step, sig)
    assert rc == (75 if sig == signal.SIGUSR1 else -signal.SIGKILL)
    state = torch.load(cut_dir / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)
    assert state["epoch"] == 0 and at_step <= state["step"] < 49, "not stopped mid-epoch"
    assert len(state["bad_samples"]) >= 3  # the files met before the resume point
    done = subprocess.run(train_cmd(str(cfg), run_dir=cut_dir), cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    assert _report(cut_dir) == reference
