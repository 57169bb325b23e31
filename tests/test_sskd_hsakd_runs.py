"""SSKD and HSAKD end to end on the demo data: the teacher-phase run (``<m>.teacher``), then the
student run that loads its heads, with the lineage tag in run_info.json and MLflow; SSKD's
student run also from a teacher cache of the rotated copies (launch/cache_teacher.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

COMMON = ("optim.epochs=1", "optim.milestones=[]", "train.max_steps_per_epoch=3",
          "train.progress=false", "data.batch_size=8", "data.eval_splits=[test_unbiased]",
          "model.arch=resnet8")
HEADS = {"sskd": "teacher_head.", "hsakd": "teacher_heads."}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "student.pt"
    torch.save(build_model("resnet14", 10).state_dict(), path)
    return path


def _train(cfg: str, run_dir: Path, *sets: str) -> None:
    from accelerate.state import AcceleratorState

    from launch.train import main

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run
    args = ["--cfg", str(ROOT / cfg), "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sskd", "hsakd"])
def test_teacher_phase_then_student(method: str, demo_root: Path, teacher_ckpt: Path,
                                    tmp_path: Path) -> None:
    tracking = (f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
                f"tracking.artifact_dir={tmp_path / 'artifacts'}")
    teacher = (f"data.root={demo_root}", "teacher.arch=resnet14",
               f"teacher.weights={teacher_ckpt}", *COMMON, *tracking)
    phase_dir = tmp_path / "teacher-phase"
    _train(f"configs/demo/{method}_teacher.yaml", phase_dir, *teacher, "model.arch=resnet14",
           f"model.weights={teacher_ckpt}")
    # the student slot held the teacher, untouched; the heads were trained and saved
    saved = torch.load(phase_dir / "student.pt", weights_only=True)
    original = torch.load(teacher_ckpt, weights_only=True)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    heads = torch.load(phase_dir / "method.pt", weights_only=True)
    assert heads.pop("teacher_digest").any()  # which teacher they belong to
    assert heads and all(k.startswith(HEADS[method]) for k in heads)
    phase_info = json.loads((phase_dir / "run_info.json").read_text())
    assert phase_info["mlflow_run_id"]
    last = json.loads((phase_dir / "metrics.json").read_text())["last"]
    assert {"method/ss_top1", "method/aux_top1"} & set(last)

    student_dir = tmp_path / "student"
    heads_path = phase_dir / "method.pt"
    _train(f"configs/demo/{method}.yaml", student_dir, *teacher,
           f"method.teacher_heads={heads_path}")
    info = json.loads((student_dir / "run_info.json").read_text())
    assert info["teacher_heads"] == str(heads_path)
    assert info["teacher_heads_run_id"] == phase_info["mlflow_run_id"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    tags = client.get_run(info["mlflow_run_id"]).data.tags
    assert tags["teacher_heads_run_id"] == phase_info["mlflow_run_id"]
    after = torch.load(student_dir / "method.pt", weights_only=True)
    for k, v in heads.items():  # frozen: the teacher phase's heads, unchanged
        assert torch.equal(after[k], v), k
    assert any(k.startswith("student_head") for k in after)

    if method == "sskd":  # the same student run from a cache of the rotated copies
        from launch.cache_teacher import main as cache_main

        cache = (f"teacher.cache_dir={tmp_path / 'cache'}", "data.views=1",
                 "data.train_fraction=0.05")  # 200 samples × 4 copies to cache
        sets = [*teacher, f"method.teacher_heads={heads_path}", *cache]
        assert cache_main(["--cfg", str(ROOT / "configs/demo/sskd.yaml"),
                           *[a for s in sets for a in ("--set", s)]]) == 0
        _train("configs/demo/sskd.yaml", tmp_path / "cached", *sets, "teacher.source=cached")
        assert (tmp_path / "cached" / "student.pt").exists()
