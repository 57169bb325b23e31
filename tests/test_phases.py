"""The trainer's plan of initial phases: which phase each run epoch belongs to, and its LR."""

from __future__ import annotations

import pytest

from pipeline.distill.base import Phase
from pipeline.train.phases import PhasePlan


def test_plan_maps_run_epochs_to_phases_and_fills_the_run_lr() -> None:
    plan = PhasePlan((Phase("init", 2), Phase("warm", 1, lr=0.01)), 3, default_lr=0.05)
    assert plan.total_epochs == 6 and plan.initial_epochs == 3
    seen = [(plan.at(e).name, plan.at(e).local) for e in range(6)]
    assert seen == [("init", 0), ("init", 1), ("warm", 0), ("main", 0), ("main", 1), ("main", 2)]
    assert [p.lr for p in plan.phases] == [0.05, 0.01]  # None → the run's optim.lr
    assert plan.at(0).phase == Phase("init", 2, lr=0.05)
    assert plan.describe() == ("init 2 epoch(s) at lr 0.05, then warm 1 epoch(s) at lr 0.01, "
                               "then main 3 epoch(s)")


def test_plan_refusals() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        PhasePlan((Phase("a", 1, 0.1), Phase("a", 1, 0.1)), 1)
    with pytest.raises(ValueError, match="pass default_lr"):
        PhasePlan((Phase("a", 1),), 1)
    with pytest.raises(ValueError, match="other than 'main'"):
        Phase("main", 1)
    with pytest.raises(ValueError, match="expected epochs >= 1 and lr > 0"):
        Phase("a", 1, lr=0.0)


def test_a_checkpoint_from_another_phase_plan_is_refused() -> None:
    from pipeline.config.errors import ConfigError

    plan = PhasePlan((Phase("init", 1),), 2, default_lr=0.05)
    plan.check_resume(0, "init")
    plan.check_resume(1, "main")
    plan.check_resume(1, None)  # checkpoints of runs without phases say nothing
    with pytest.raises(ConfigError, match="written in phase 'init' at run epoch 2, which this "
                                          "run's plan .* puts in phase 'main'"):
        plan.check_resume(1, "init")  # written with init_epochs 2, resumed with 1
