"""Two gloo processes, one image per process and step, six unreadable files: the steps where
one process has no readable image are zero-loss steps there; both processes run every step and
end with identical weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.config.schema import DataSpec
from pipeline.data import build_index
from pipeline.data.loader import train_order
from tests.awkward_files import BAD, make_awkward_folder, run_config
from tests.conftest import PY, ROOT, run_env, train_cmd


def _empty_steps(root: Path) -> dict[int, list[int]]:
    """process → the steps of epoch 0 where its one sample is unreadable."""
    index = build_index(DataSpec(dataset="imagefolder", root=str(root)), "train")
    bad = {i for i in range(len(index)) if Path(index.path(i)).name in BAD}
    return {p: [s for s, row in enumerate(train_order(len(index), 1, 0, 0, p, 2).tolist())
                if row[0] in bad] for p in range(2)}


def test_all_unreadable_batch_is_a_zero_loss_step_on_that_process(tmp_path: Path) -> None:
    root = make_awkward_folder(tmp_path / "data", good=9, val=2)  # 36 samples: no remainder
    empty = _empty_steps(root)
    assert empty[0] and empty[1] and set(empty[0]) != set(empty[1])  # on one process at a time
    cfg = run_config(tmp_path / "run.yaml", root, batch_size=1,
                     extra="  dist_timeout_s: 120\n")
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(str(cfg), run_dir=run_dir)[1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = (3 * 9 + 3 + len(BAD)) // 2
    assert metrics["world_size"] == 2 and metrics["updates"] == steps
    a, b = metrics["param_checksums"]
    assert a == b, "the replicas diverged"
    for p, where in empty.items():
        for step in where:
            line = f"process {p}: epoch 1 step {step}: no readable image in this batch"
            assert line in out.stdout, (line, out.stdout[-3000:])
    report = json.loads((run_dir / "bad_samples.json").read_text())
    assert sorted(Path(r["path"]).name for r in report) == sorted(BAD)
