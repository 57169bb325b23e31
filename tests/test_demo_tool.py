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


def _touch_stage(tmp_path: Path, name: str, after: list[str], code: str = "pass") -> demo.Stage:
    """A stage whose command records when it ran and how many threads it was given."""
    done = tmp_path / f"{name}.done"
    script = ("import os, sys, time; from pathlib import Path; "
              f"p = Path({str(tmp_path)!r}); t0 = time.time(); {code}; time.sleep(0.3); "
              f"(p / '{name}.log').write_text(f'{{t0}} {{time.time()}} "
              "{os.environ[\"OMP_NUM_THREADS\"]}'); "
              f"Path({str(done)!r}).write_text('ok')")
    return demo.Stage(name, ["-c", script], done, 1.0, [],
                      [tmp_path / f"{a}.done" for a in after])


def _ran(tmp_path: Path, name: str) -> tuple[float, float, int]:
    start, end, threads = (tmp_path / f"{name}.log").read_text().split()
    return float(start), float(end), int(threads)


def test_schedule_runs_stages_after_what_they_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "OUT", tmp_path / "out")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    plan = [_touch_stage(tmp_path, "teacher", []), _touch_stage(tmp_path, "vanilla", []),
            _touch_stage(tmp_path, "cache", ["teacher"]),
            _touch_stage(tmp_path, "kd", ["cache"]), _touch_stage(tmp_path, "cid", ["cache"])]
    demo.Schedule(plan, jobs=2, cores=2).run()
    teacher, vanilla, cache = (_ran(tmp_path, n) for n in ("teacher", "vanilla", "cache"))
    kd, cid = _ran(tmp_path, "kd"), _ran(tmp_path, "cid")
    assert teacher[0] < vanilla[1] and vanilla[0] < teacher[1]  # side by side
    assert teacher[2] == vanilla[2] == 1  # one core each
    assert cache[0] >= teacher[1] and min(kd[0], cid[0]) >= cache[1]
    assert kd[0] < cid[1] and cid[0] < kd[1] and kd[2] == cid[2] == 1
    again = tmp_path / "again.log"
    plan.append(_touch_stage(tmp_path, "again", ["kd"]))
    demo.Schedule(plan, jobs=2, cores=2).run()  # finished stages are not run again
    assert again.exists() and _ran(tmp_path, "teacher") == teacher
    assert _ran(tmp_path, "again")[2] == 2  # alone: both cores
    demo.Schedule(plan, jobs=2, cores=2).run()  # everything finished: nothing to do
    assert _ran(tmp_path, "again")[2] == 2


def test_schedule_stops_at_a_failed_stage(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "OUT", tmp_path / "out")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    plan = [_touch_stage(tmp_path, "teacher", [], "print('bad weights'); sys.exit(2)"),
            _touch_stage(tmp_path, "cache", ["teacher"])]
    with pytest.raises(SystemExit, match=r"(?s)teacher failed \(exit 2\).*bad weights"):
        demo.Schedule(plan, jobs=2, cores=2).run()
    assert not (tmp_path / "cache.log").exists()
