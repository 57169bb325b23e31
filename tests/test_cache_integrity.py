"""Cache integrity: checksums on first read, --verify/--repair, a signal mid-pass → exit 75.

Uses the tiny cache setup of ``test_cache`` (64 synthetic images, K = 2 views + eval view,
chunks of 24 samples: 9 chunks).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.teacher.cache_format import Manifest, Unit, marker_path, verify_cache
from pipeline.teacher.cache_verify import CorruptCacheError
from pipeline.teacher.cached import open_cached_teacher
from tests.conftest import PY, ROOT, run_env
from tests.test_cache import FIELDS, Setup, _assert_same_cache, setup  # noqa: F401

FIELDS_SET = ("--set", "teacher.cache_fields=[embedding,logits]")  # the reference's fields


def _flip_byte(cache: Path, unit: Unit, row_in_chunk: int = 3) -> None:
    m = Manifest.load(cache)
    header = np.load(cache / "logits.npy", mmap_mode="r").offset
    row = m.row_range(unit)[0] + row_in_chunk
    with open(cache / "logits.npy", "r+b") as f:
        f.seek(header + row * 10 * 2 + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def test_flipped_byte_is_refused_on_first_read_and_repaired(
        setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from launch.cache_teacher import main

    cache = tmp_path / "c"
    shutil.copytree(setup.ref, cache)
    _flip_byte(cache, Unit(1, 2))
    spec = setup.spec(cache=cache)
    teacher = open_cached_teacher(spec, FIELDS, 10)
    teacher.lookup(np.array([0, 30, 63]), np.array([0, 0, 0]))  # view 0: intact
    teacher.lookup(np.array([5]), np.array([1]))  # view 1, chunk 0: intact
    with pytest.raises(CorruptCacheError) as info:
        teacher.lookup(np.array([5, 50]), np.array([1, 1]))  # sample 50: view 1, chunk 2
    message = str(info.value)
    assert "chunk v1_c2 (rows 112..127) of array 'logits'" in message
    assert "--verify" in message and "--repair" in message
    # --repair: found by the checksums, rewritten, byte-identical to the reference again.
    rc = main(["--cfg", str(setup.cfg), "--set", f"teacher.cache_dir={cache}", *FIELDS_SET,
               "--repair"])
    out = capsys.readouterr()
    assert rc == 0, out
    assert "corrupt: v1_c2: checksum mismatch in logits" in out.err
    assert verify_cache(cache).ok
    _assert_same_cache(setup.ref, cache)
    teacher = open_cached_teacher(spec, FIELDS, 10)
    teacher.lookup(np.array([5, 50]), np.array([1, 1]))


def test_verify_sets_corrupt_chunks_aside_for_the_next_pass(
        setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from launch.cache_teacher import main

    cache = tmp_path / "c"
    shutil.copytree(setup.ref, cache)
    _flip_byte(cache, Unit(0, 1))
    args = ["--cfg", str(setup.cfg), "--set", f"teacher.cache_dir={cache}", *FIELDS_SET]
    assert main([*args, "--verify"]) == 1
    assert "1 corrupt chunk(s) marked incomplete" in capsys.readouterr().err
    assert not marker_path(cache, Unit(0, 1)).exists()
    assert (cache / "done" / "v0_c1.corrupt.json").exists()
    assert main(args) == 0  # a plain pass rewrites it
    assert "wrote 1 chunk(s)" in capsys.readouterr().out
    _assert_same_cache(setup.ref, cache)


def _catches_sigusr1(pid: int) -> bool:
    """Whether the process has installed a SIGUSR1 handler (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1],
               16)
    return bool(mask & (1 << (signal.SIGUSR1 - 1)))


def test_sigusr1_mid_pass_exits_75_and_the_rerun_completes(
        setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    """The signal arrives before the first chunk is done: that chunk is finished and marked,
    the process exits 75, and the re-run writes the rest to the reference's bytes."""
    cache = tmp_path / "c"
    cmd = [PY, str(ROOT / "launch/cache_teacher.py"), "--cfg", str(setup.cfg),
           "--set", f"teacher.cache_dir={cache}", *FIELDS_SET]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _catches_sigusr1(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by a signal after completing chunk v0_c0" in err
    done = sorted(p.name for p in (cache / "done").glob("*.json"))
    assert done == ["v0_c0.json"]
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "wrote 8 chunk(s)" in again.stdout and "skipped 1 complete" in again.stdout
    _assert_same_cache(setup.ref, cache)
