"""Runs started side by side on a fresh SQLite tracking database (make demo on a fresh clone)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

START = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.config.schema import TrackingSpec
from pipeline.track.mlflow_tracker import Tracker
while time.time() < {at}:
    time.sleep(0.005)
tracker = Tracker(TrackingSpec(uri={uri!r}, experiment="race"), enabled=True)
print(tracker.start("run-" + sys.argv[1], {{"k": 1}}, {{}}))
tracker.finish()
"""


def test_processes_opening_a_new_database_at_once_all_start_their_runs(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "mlruns.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    code = START.format(root=str(ROOT), at=time.time() + 4.0, uri=uri)  # all imported by then
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    run_ids = [out.strip().splitlines()[-1] for out, _ in outs]
    assert len(set(run_ids)) == 3 and not any(r.startswith("pending-") for r in run_ids)
    listed = subprocess.run(
        [sys.executable, "-c", "import json, sys; from mlflow.tracking import MlflowClient; "
         f"c = MlflowClient({uri!r}); e = c.get_experiment_by_name('race'); "
         "print(json.dumps([r.info.run_name for r in c.search_runs([e.experiment_id])]))"],
        check=True, capture_output=True, text=True).stdout
    assert sorted(json.loads(listed.strip().splitlines()[-1])) == ["run-0", "run-1", "run-2"]
