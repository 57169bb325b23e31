"""CPU thread setup (pipeline/threads.py): OpenMP waits passively, each process gets its share."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import pipeline
from pipeline.threads import share_cpu_threads
import torch
threads = share_cpu_threads({processes})
print(json.dumps({{"wait": os.environ.get("OMP_WAIT_POLICY"), "threads": threads,
                  "torch_threads": torch.get_num_threads(),
                  "interop": torch.get_num_interop_threads()}}))
"""


def _probe(processes: int = 1, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PIPELINE_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), processes=processes)],
                         env={**base, **env}, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_passive_waits_and_one_interop_thread_by_default() -> None:
    got = _probe()
    assert got["wait"] == "PASSIVE"
    assert got["interop"] == 1
    assert got["threads"] == got["torch_threads"] == len(os.sched_getaffinity(0))


def test_share_per_local_process_and_user_choices_win() -> None:
    cores = len(os.sched_getaffinity(0))
    assert _probe(processes=2)["threads"] == max(1, cores // 2)
    got = _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert got["wait"] == "ACTIVE" and got["threads"] == got["torch_threads"] == 1


def test_switched_off_leaves_library_defaults() -> None:
    got = _probe(PIPELINE_THREADS="off")
    assert got["wait"] is None
    assert got["interop"] == got["torch_threads"]  # torch's default: one inter-op per core


def _first_import_line(tree: ast.Module, names: tuple[str, ...]) -> int | None:
    lines = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.split(".")[0] in names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in names:
                lines.append(node.lineno)
    return min(lines) if lines else None


NO_COMPUTE = {"tools/convert_moco.py"}  # renames a state dict's keys: no thread pool to set up
ENTRY_POINTS = sorted(p for p in [*ROOT.glob("launch/*.py"), *ROOT.glob("tools/*.py")]
                      if str(p.relative_to(ROOT)) not in NO_COMPUTE)


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_entry_point_imports_the_package_before_torch(path: Path) -> None:
    """A module-level ``import torch`` (or numpy, which can load an OpenMP runtime) before the
    package would load libgomp with its spinning default."""
    tree = ast.parse(path.read_text())
    first_torch = _first_import_line(tree, ("torch", "numpy", "torchvision", "accelerate"))
    if first_torch is None:
        return
    first_pipeline = _first_import_line(tree, ("pipeline",))
    assert first_pipeline is not None and first_pipeline < first_torch, (
        f"{path.relative_to(ROOT)} imports torch/numpy (line {first_torch}) before pipeline")
