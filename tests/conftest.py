"""Shared fixtures: the bundled demo data (built once per session) and small run helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled colour-biased MNIST data, written once for the whole test session."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    subprocess.run([PY, str(ROOT / "tools/make_demo_data.py"), "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    return out


def train_cmd(cfg: str, *overrides: str, run_dir: Path | None = None) -> list[str]:
    cmd = [PY, str(ROOT / "launch/train.py"), "--cfg", str(ROOT / cfg)]
    for o in overrides:
        cmd += ["--set", o]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    return cmd


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MLFLOW_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env
