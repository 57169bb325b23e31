"""tools/study.py: configs × seeds, several runs at a time, one table of mean ± std."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
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


def _load_study_tool():  # tools/ is not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("study_tool", ROOT / "tools" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_tool"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _overrides(cmd_overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in cmd_overrides)


def test_grid_cells_times_seeds_and_resume(tmp_path: Path, monkeypatch, caplog) -> None:
    """2 rows × (2 × 2 grid) × 2 seeds = 16 runs, each with its cell's overrides and tags; a
    second start runs only the run left unfinished, under the same MLflow parent."""
    from pipeline.catalog import load_run_config
    from pipeline.config import dump_config

    cfg = tmp_path / "base.yaml"
    cfg.write_text(CONFIG.format(objective="ce"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts folder
    study = _load_study_tool()
    calls: list[tuple[Path, dict[str, str]]] = []

    def fake_train(config: str, run_dir: Path, overrides: list[str], jobs: int = 1) -> None:
        """What launch/train.py leaves behind: the resolved config and metrics.json."""
        calls.append((run_dir, _overrides(overrides)))
        spec = load_run_config(config, overrides, check_paths=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(spec))
        top1 = 10.0 * spec.optim.lr + spec.seed + (1.0 if spec.method["objective"] == "mse" else 0)
        (run_dir / "metrics.json").write_text(json.dumps(
            {"last": {"val/top1": top1, "val/ece": 0.1}, "best": {}}))

    monkeypatch.setattr(study, "train", fake_train)
    out = tmp_path / "study"
    argv = [str(cfg), "--row", f"wd={cfg}:optim.weight_decay=0.001", "--grid",
            "method.objective=ce,mse", "--grid", "optim.lr=0.1,0.05", "--seeds", "0", "1",
            "--name", "grid-test", "--out", str(out)]
    assert study.main(argv) == 0
    assert len(calls) == 16
    seen = {}
    for run_dir, o in calls:
        cell = o["tracking.tags.study_cell"].strip('"')
        seed = o["seed"]
        assert run_dir == out / f"{cell}-s{seed}"
        assert o["tracking.tags.study_seed"] == f'"{seed}"'
        row, objective, lr = cell.split("-")
        assert o["method.objective"] == objective.split("=")[1]
        assert o["optim.lr"] == lr.split("=")[1]
        assert ("optim.weight_decay" in o) == (row == "wd")
        assert o["tracking.tags.study_method"].strip('"') == (
            "vanilla" if objective == "objective=ce" else "vanilla-mse")
        assert o["tracking.tags.study_grid"].strip('"') == (
            f"method.objective={o['method.objective']}; optim.lr={o['optim.lr']}")
        seen[(cell, seed)] = o["tracking.parent_run_id"]
    assert len(seen) == 16 and len(set(seen.values())) == 1
    assert "MLflow at" not in caplog.text  # the parent's table and means were all accepted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base-objective=mse-lr=0.05"]["val/top1"][0] == 10 * 0.05 + 0.5 + 1

    (out / "wd-objective=ce-lr=0.1-s1" / "metrics.json").unlink()  # a study stopped half-way
    calls.clear()
    assert study.main(argv) == 0
    assert [c[0].name for c in calls] == ["wd-objective=ce-lr=0.1-s1"]
    assert calls[0][1]["tracking.parent_run_id"] == next(iter(seen.values()))

    calls.clear()  # another value of a key is another config: that run is not skipped
    assert study.main([*argv[:-2], "--set", "optim.epochs=2", "--out", str(out)]) == 0
    assert len(calls) == 16


def test_bad_grid_key_is_refused_before_anything_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "base.yaml"
    cfg.write_text(CONFIG.format(objective="ce"))
    done = subprocess.run([PY, "tools/study.py", str(cfg), "--grid", "optim.lrr=0.1,0.2",
                           "--out", str(tmp_path / "s")], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "optim.lrr" in done.stderr and "optim.lr" in done.stderr
    assert not (tmp_path / "s").exists()


def test_real_grid_runs_are_tagged_and_a_rerun_skips_them(tmp_path: Path) -> None:
    """Two real one-epoch runs from a grid: MLflow has each cell's tags and params under one
    parent; the second start skips both without starting a training process."""
    import mlflow

    cfg = tmp_path / "base.yaml"
    cfg.write_text(CONFIG.format(objective="ce"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = run_env(MLFLOW_TRACKING_URI=uri)
    cmd = [PY, "tools/study.py", "--row", f"plain={cfg}", "--grid", "method.objective=ce,mse",
           "--seeds", "3", "--name", "real-grid", "--out", str(tmp_path / "s")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("kd")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("study") == "true"]
    children = [r for r in runs if r.data.tags.get("study") == "real-grid"]
    assert len(parent) == 1 and len(children) == 2
    for r in children:
        tags, objective = r.data.tags, r.data.params["method.objective"]
        assert tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert tags["study_cell"] == f"plain-objective={objective}"
        assert tags["study_grid"] == f"method.objective={objective}"
        assert (tags["study_seed"], r.data.params["seed"]) == ("3", "3")
        assert tags["study_pair"] == "resnet8" and r.info.status == "FINISHED"
    again = subprocess.run([*cmd, "--report"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip ") == 2 and "launch/train.py" not in again.stdout
    assert len(client.search_runs([exp.experiment_id])) == 3
    report = (tmp_path / "s" / "report" / "report.md").read_text()  # --report: the study's table
    assert "| plain-objective=ce | 1 |" in report and "| plain-objective=mse | 1 |" in report
