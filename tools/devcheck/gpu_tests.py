"""The ``gpu``-marked tests (tests/test_gpu.py) run by pytest on the device."""

from __future__ import annotations

import re
from typing import Any

from devcheck.common import PY, ROOT, Context, run


def gpu_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py``: the counts and the end of its report."""
    junit = ctx.work / "gpu_tests.xml"
    done = run([PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
                f"--junitxml={junit}", str(ROOT / "tests/test_gpu.py")], ctx.budget_s - 10)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                   done["stdout"])}
    return {"results": {"counts": counts, "pytest": done},
            "checks": {"pytest_passed": done["returncode"] == 0 and counts.get("passed", 0) > 0}}
