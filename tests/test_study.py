"""tools/study.py: configs × seeds, several runs at a time, one table of mean ± std."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

from tests.conftest import PY, ROOT, run_env

CONFIG = """\
name: study-test
data:
  dataset: synthetic
  synthetic_size: 32
  augment: cifar
  image_size: 32
  batch_size: 16
  eval_batch_size: 16
  workers: 0
  eval_splits: [val]
model:
  arch: resnet8
method:
  name: vanilla
  objective: {objective}
optim:
  epochs: 1
train:
  progress: false
"""


def test_two_configs_two_seeds_two_at_a_time(tmp_path: Path) -> None:
    configs = []
    for objective in ("ce", "mse"):
        cfg = tmp_path / f"{objective}.yaml"
        cfg.write_text(CONFIG.format(objective=objective))
        configs.append(str(cfg))
    name = f"pytest-study-{uuid.uuid4().hex[:8]}"
    out = ROOT / "runs" / name
    env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")
    env.pop("OMP_NUM_THREADS")  # the tool gives each run cores ÷ jobs threads
    try:
        done = subprocess.run([PY, "tools/study.py", *configs, "--seeds", "0", "1",
                               "--jobs", "2", "--name", name], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs = sorted(p.name for p in out.iterdir() if p.is_dir())
        assert runs == [f"{o}-s{s}" for o in ("ce", "mse") for s in range(2)]
        for run in runs:  # each run's output went to its own log
            assert "done: best top1" in (out / run / "train.log").read_text()
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary) == {"ce", "mse"}
        for label in ("ce", "mse"):  # the cell is the mean and std of the two runs
            tops = [json.loads((out / f"{label}-s{s}" / "metrics.json").read_text())["last"]
                    ["val/top1"] for s in range(2)]
            mean, std = summary[label]["val/top1"]
            assert abs(mean - sum(tops) / 2) < 1e-9
            assert abs(std - abs(tops[0] - tops[1]) / 2**0.5) < 1e-9
        assert "ce" in (out / "table.txt").read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)
