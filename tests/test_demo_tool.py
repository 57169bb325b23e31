"""The demo's plan (tools/demo.py), its figure, and the recipe rule (tools/demo_recipe.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


demo = _tool("demo")
recipe = _tool("demo_recipe")


def _sets(stage) -> dict[str, str]:
    return dict(o.split("=", 1) for o in stage.overrides)


def test_plan_one_teacher_one_cache_per_seed_students_from_it() -> None:
    plan = demo.stages([0, 1], [])
    teachers = [s for s in plan if "configs/demo/teacher.yaml" in s.cmd]
    caches = [s for s in plan if s.cmd[0] == "launch/cache_teacher.py"]
    students = [s for s in plan if s.cmd[0] == "launch/train.py" and s not in teachers]
    assert len(teachers) == 1 and len(caches) == 2 and len(students) == 2 * len(demo.STUDENTS)
    assert _sets(teachers[0])["optim.epochs"] == str(demo.TEACHER_EPOCHS)
    weights = str(demo.OUT / "teacher" / "student.pt")
    for cache in caches:
        sets = _sets(cache)
        assert sets["teacher.weights"] == weights and sets["data.views"] == str(demo.VIEWS)
    for student in students:
        sets = _sets(student)
        assert sets["optim.epochs"] == str(demo.STUDENT_EPOCHS)  # one recipe for all
        if "configs/demo/vanilla.yaml" in student.cmd:
            assert "teacher.source" not in sets
            continue
        cache = next(c for c in caches if _sets(c)["seed"] == sets["seed"])
        assert sets["teacher.source"] == "cached"
        assert sets["teacher.cache_dir"] == _sets(cache)["teacher.cache_dir"]
        assert sets["teacher.weights"] == weights


def test_figure_is_a_png(tmp_path: Path) -> None:
    from pipeline.evaluate.demo_figure import draw_demo_figure

    rows = {"teacher": [{"test_unbiased/top1": 95.0, "test_biased/top1": 97.0}],
            "KD": [{"test_unbiased/top1": 40.0, "test_biased/top1": 85.0},
                   {"test_unbiased/top1": 50.0, "test_biased/top1": 86.0}]}
    path = draw_demo_figure(rows, ("test_unbiased", "test_biased"), tmp_path / "f.png",
                            {"test_unbiased": 10.9, "test_biased": 79.2})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize(("scores", "chosen"), [
    ({8: 90.0, 16: 90.5}, 8),  # doubling adds < 1 point: the first length
    ({8: 80.0, 16: 90.0, 32: 90.2}, 16),
    ({8: 10.0, 16: 20.0, 32: 30.0, 64: 40.0}, 64),  # capped
])
def test_doubling_rule(monkeypatch: pytest.MonkeyPatch, scores: dict, chosen: int) -> None:
    monkeypatch.setattr(recipe, "train", lambda cfg, run_dir, epochs, seed: {"epochs": epochs})
    out = recipe.search("t", "x.yaml", [0, 1], 64, lambda d, m, e: scores[m["epochs"]],
                        lambda prev, cur: cur - prev >= recipe.TEACHER_GAIN)
    assert out["chosen_epochs"] == chosen
    assert set(out["candidates"]) <= set(scores)


def test_milestones_scale_with_epochs() -> None:
    assert recipe.milestones(8) == [5, 7]
    assert recipe.milestones(16) == [10, 14]
    assert demo.milestones(32) == "[20, 28]"
