"""Every shipped config loads, and passes ``launch/train.py --dry-run``.

A dry run replaces the data with a few synthetic images, ignores weight files, names, seeds and
tracking, and runs one short epoch; two configs that differ only in what it ignores run the
same dry run (the CE- and MSE-teacher twins of a pair, say). So every config is loaded and
checked, and one dry run is made per distinct signature: the resolved config without the keys
below. The test id names the representative and how many configs it stands for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.catalog import load_run_config
from pipeline.config import dump_config
from tests.conftest import ROOT

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if "_base" not in p.parts and not p.name.startswith("_"))
# What the dry run replaces or never reads (launch/train.py dry_run_spec, load_teacher=False).
IGNORED = {
    "": ("name", "seed", "run_dir", "tracking"),
    "data": ("root", "dataset", "backend", "batch_size", "eval_batch_size", "workers",
             "synthetic_size", "eval_splits", "train_split", "neighbours", "ffcv_dir"),
    "model": ("weights",),
    "teacher": ("weights", "cache_dir", "source"),
    "optim": ("epochs", "milestones"),
    "method": ("teacher_heads",),  # a teacher-phase run's heads (SSKD, HSAKD): not read
    "train": ("progress", "log_every_steps", "checkpoint_every_steps", "max_steps_per_epoch"),
}


def signature(cfg: str) -> str:
    import yaml

    plain = yaml.safe_load(dump_config(load_run_config(ROOT / cfg, check_paths=False)))
    for section, keys in IGNORED.items():
        target = plain if not section else (plain.get(section) or {})
        for key in keys:
            target.pop(key, None)
    return json.dumps(plain, sort_keys=True)


def _representatives() -> list[tuple[str, int]]:
    groups: dict[str, list[str]] = {}
    for cfg in CONFIGS:
        groups.setdefault(signature(cfg), []).append(cfg)
    return [(members[0], len(members)) for members in groups.values()]


REPRESENTATIVES = _representatives()


def test_configs_are_found_and_grouped() -> None:
    assert len(CONFIGS) > 200
    assert sum(n for _, n in REPRESENTATIVES) == len(CONFIGS)
    twins = [n for _, n in REPRESENTATIVES if n > 1]
    assert twins, "expected some configs to share a dry run (e.g. CE/MSE teacher twins)"


@pytest.mark.parametrize(("cfg", "count"), REPRESENTATIVES,
                         ids=[f"{c}+{n - 1}" if n > 1 else c for c, n in REPRESENTATIVES])
def test_dry_run(cfg: str, count: int, capsys: pytest.CaptureFixture[str],
                 tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    from launch.train import main

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per config
    assert main(["--cfg", str(ROOT / cfg), "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
