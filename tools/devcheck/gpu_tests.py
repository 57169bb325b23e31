"""The ``gpu``-marked tests (tests/test_gpu.py) run by pytest on the device."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from devcheck.common import PY, ROOT, Context, child_env


def gpu_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -v -m gpu tests/test_gpu.py``: each test's outcome, also when the stage's time
    runs out (the log is written as the tests finish)."""
    log = ctx.work / "gpu_tests.log"
    cmd = [PY, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
           str(ROOT / "tests/test_gpu.py")]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            returncode: int | None = proc.wait(timeout=max(ctx.budget_s - 10, 10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
    text = log.read_text()
    outcomes = dict(re.findall(r"test_gpu\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text))
    return {"results": {"returncode": returncode, "timed_out": returncode is None,
                        "seconds": round(time.perf_counter() - t0, 1), "tests": outcomes,
                        "report_tail": text[-6000:]},
            "checks": {"pytest_passed": returncode == 0 and "PASSED" in outcomes.values()}}
