"""tools/device_check.py: its --quick CPU mode runs every stage (so the device check cannot rot)
with MLflow, DALI, FFCV, mlxtend and scikit-learn made unimportable (the device machine has
none of them), and a failing or hanging stage is written up without stopping the others."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, run_env

# What the GPU machine lacks (and what the training path must not need with tracking off).
BLOCKED = ("mlflow", "nvidia.dali", "ffcv", "numba", "mlxtend", "sklearn", "scipy", "tqdm",
           "torchdistill")
BLOCKED_DISTS = ("mlflow", "mlflow_skinny", "mlflow_tracing", "nvidia_dali_cuda130", "ffcv",
                 "numba", "mlxtend", "scikit_learn", "scipy", "tqdm", "torchdistill")
SHIM = f'''
import sys
from importlib.machinery import PathFinder


class _Absent:
    """The path finder, except that the device machine's missing packages are not found:
    an import fails and a probe (``importlib.util.find_spec``) answers None, as if they were
    not installed."""

    names = {BLOCKED!r}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in cls.names):
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):  # importlib.metadata: not installed either
        for dist in PathFinder.find_distributions(*args, **kwargs):
            name = (dist.metadata["Name"] or "").lower().replace("-", "_").replace(".", "_")
            if name not in {BLOCKED_DISTS!r}:
                yield dist

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()


sys.meta_path[:] = [_Absent if f is PathFinder else f for f in sys.meta_path]
'''


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    return run_env(PYTHONPATH=str(shim))


def test_the_shim_blocks_what_the_device_lacks(tmp_path: Path) -> None:
    code = ("import importlib.util, json; out = {}\n"
            "for n in ('mlflow', 'nvidia.dali', 'ffcv', 'sklearn', 'torch'):\n"
            "    try:\n        __import__(n); out[n] = True\n"
            "    except ImportError:\n        out[n] = False\n"
            "out['probe'] = importlib.util.find_spec('mlflow')\n"
            "import importlib.metadata as md\n"
            "out['torch_dist'] = bool(md.version('torch'))\n"
            "out['tqdm_dist'] = any(d.metadata['Name'] == 'tqdm' for d in md.distributions())\n"
            "print(json.dumps(out))")
    done = subprocess.run([PY, "-c", code], env=_blocked_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert json.loads(done.stdout) == {"mlflow": False, "nvidia.dali": False, "ffcv": False,
                                       "sklearn": False, "torch": True, "probe": None,
                                       "torch_dist": True, "tqdm_dist": False}, \
        done.stderr[-2000:]


@pytest.mark.timeout(1500)  # ~2 min on an idle 2-core machine; far more on a shared one
def test_quick_mode_runs_every_stage_without_mlflow(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([PY, str(ROOT / "tools/device_check.py"), "--out", str(out), "--work",
                           str(work), "--quick", "--device", "cpu", "--total-s", "900"],
                          cwd=ROOT, env=_blocked_env(tmp_path), capture_output=True, text=True,
                          timeout=1000)
    summary = json.loads((out / "summary.json").read_text())
    assert done.returncode == 0 and summary["ok"], done.stdout[-4000:] + done.stderr[-2000:]
    stages = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if
              p.stem != "summary"}
    assert set(stages) == set(summary["stages"]) and "gpu_tests" in stages
    assert stages["gpu_tests"]["status"] == "skipped"  # no CUDA here
    for name, record in stages.items():
        if name != "gpu_tests":
            assert record["status"] == "ok", (name, record.get("error"), record.get("checks"))
    env = stages["environment"]["results"]
    assert not env["packages"]["mlflow"] and not env["packages"]["nvidia.dali"]
    assert not env["mlflow_imported_by_training_path"]
    assert len(stages["dry_runs"]["checks"]) == 9  # KD, CID, CoSS × bf16, fp16, fp32
    assert stages["resume"]["checks"]["signal_exit_75"]
    assert stages["resume"]["results"]["max_abs_weight_diff_vs_uninterrupted"] == 0.0
    assert set(stages["throughput"]["results"]["summary"]["images_per_s"]) == {
        "student_only", "online", "cached", "bare_student", "bare_teacher_fwd", "bare_online"}
    loaders = stages["decode"]["results"]["loaders"]
    assert loaders["nvjpeg"]["images"] == loaders["torchvision"]["images"] > 0


@pytest.fixture
def dc():
    """The device_check module (tools/ is not a package: put it on the path)."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    import device_check

    return device_check


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(out=tmp_path / "out", work=tmp_path / "work", quick=True,
                              device="cpu", budget=10.0, isolate=False)


def test_a_failing_stage_writes_its_error(dc, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from devcheck import io_stages

    def boom(ctx):
        raise RuntimeError("the stage broke")

    monkeypatch.setattr(io_stages, "boom", boom, raising=False)
    monkeypatch.setattr(io_stages, "half", lambda ctx: {"checks": {"a": True, "b": False}},
                        raising=False)
    monkeypatch.setitem(dc.STAGES, "boom", ("io_stages", "boom", 10, 10, False))
    monkeypatch.setitem(dc.STAGES, "half", ("io_stages", "half", 10, 10, False))
    args = _args(tmp_path)
    assert not dc.run_stage(args, "boom")
    record = json.loads((args.out / "boom.json").read_text())
    assert record["status"] == "failed" and "the stage broke" in record["error"]
    assert not dc.run_stage(args, "half")
    assert json.loads((args.out / "half.json").read_text())["status"] == "failed"


def test_a_stage_out_of_time_is_killed_and_recorded(dc, tmp_path: Path) -> None:
    args = _args(tmp_path)
    records = dc._child(args, ["environment", "memmap"], budget=0.5)
    assert {r["status"] for r in records.values()} == {"timeout"}
    assert json.loads((args.out / "memmap.json").read_text())["status"] == "timeout"
