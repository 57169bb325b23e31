"""pipeline.malloc: freed memory stays in the heap, so CPU steps stop faulting pages in."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _settings(env: dict[str, str]) -> dict[str, int]:
    code = "import json, pipeline.malloc as m; print(json.dumps(m.keep_freed_memory()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_sets_what_the_user_did_not() -> None:
    assert _settings({}) == {"MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_TOP_PAD_": 1 << 30}
    assert _settings({"MALLOC_TOP_PAD_": "0"}) == {"MALLOC_TRIM_THRESHOLD_": 1 << 30}
    assert _settings({"PIPELINE_MALLOC": "off"}) == {}


def test_training_steps_stop_faulting_pages_in() -> None:
    spec = importlib.util.spec_from_file_location("bench_malloc", ROOT / "tools/bench_malloc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    off = bench.measure("resnet8", "off", 0.5)["faults_per_step"]
    on = bench.measure("resnet8", "on", 0.5)["faults_per_step"]
    assert off > 1000 and on < off / 10, (off, on)
