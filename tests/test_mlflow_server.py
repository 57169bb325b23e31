"""Tracking over HTTP against a real ``mlflow server``, and surviving its loss mid-run.

The server: SQLite backend, proxied artifacts in a temporary folder, 127.0.0.1 on a free port, one
worker, no job runner (NOTES-stack trap 3). It is started once per module, killed (its whole
process group: the CLI and its uvicorn child) and started again on the same port and database.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config.schema import TrackingSpec
from pipeline.track.buffer import BUFFER_NAME, read_records
from pipeline.track.mlflow_tracker import Tracker
from tests.conftest import PY, ROOT, run_env, train_cmd

OUTAGE = "WARNING: MLflow at"  # the first words of the one warning per outage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.folder / "server.log").open("a")
        cmd = [PY, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        # Its own session, so the CLI and its uvicorn child go down together by its PID.
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.read() == b"OK":
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server not healthy within 120 s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


@pytest.fixture
def live(server: Server) -> Server:
    """The module's server, started again if an earlier test left it down."""
    if not server.up:
        server.start()
    return server


def _client(uri: str):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _resend(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "tools/mlflow_resend.py"), str(run_dir)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)


def _sets(demo_root: Path, uri: str, epochs: int, steps: int) -> tuple[str, ...]:
    return (f"data.root={demo_root}", f"tracking.uri={uri}", "tracking.experiment=server-test",
            f"optim.epochs={epochs}", "optim.milestones=[]", f"train.max_steps_per_epoch={steps}",
            "train.log_every_steps=2", "train.progress=false",
            "data.eval_splits=[test_unbiased]")


def test_training_logs_to_server(live: Server, demo_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = subprocess.run(
        train_cmd("configs/demo/vanilla.yaml", *_sets(demo_root, live.uri, 1, 4), run_dir=run_dir),
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert OUTAGE not in out.stderr and not (run_dir / BUFFER_NAME).exists()
    run_id = json.loads((run_dir / "run_info.json").read_text())["mlflow_run_id"]
    client = _client(live.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "1" and run.data.params["method.name"] == "vanilla"
    assert run.data.tags["method"] == "vanilla"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run_id, "test_unbiased/top1")] == [4]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "metrics.json"}
    local = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text())["mlflow_run_id"] == run_id


def test_training_survives_server_loss_and_resend_completes_history(
    live: Server, demo_root: Path, tmp_path: Path
) -> None:
    epochs, steps = 3, 10
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd("configs/demo/vanilla.yaml", *_sets(demo_root, live.uri, epochs, steps),
                  run_dir=run_dir),
        cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # kill the server once the first epoch is logged
            if line.startswith("epoch 1/"):
                live.kill()
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not live.up
    assert proc.returncode == 0, stderr[-3000:]
    assert (run_dir / "student.pt").exists()
    assert stderr.count(OUTAGE) == 1, stderr[-3000:]  # one warning, not one per step
    assert "tools/mlflow_resend.py" in stderr
    records = read_records(run_dir / BUFFER_NAME)
    ops = {r["op"] for r in records}
    assert {"metrics", "artifact", "terminated"} <= ops, ops

    failed = _resend(run_dir)  # still down: nothing lost, exit 1
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert len(read_records(run_dir / BUFFER_NAME)) == len(records)

    live.start()
    sent = _resend(run_dir)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert not (run_dir / BUFFER_NAME).exists()
    run_id = json.loads((run_dir / "run_info.json").read_text())["mlflow_run_id"]
    client = _client(live.uri)
    loss_steps = [e * steps + s for e in range(epochs) for s in range(2, steps + 1, 2)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == loss_steps
    top1 = client.get_metric_history(run_id, "test_unbiased/top1")
    assert sorted(m.step for m in top1) == [steps, 2 * steps, 3 * steps]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "metrics.json"}
    again = _resend(run_dir)  # nothing left: a no-op
    assert again.returncode == 0 and "nothing to send" in again.stdout


def test_run_created_later_when_server_down_at_start(
    live: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No server at start: a pending run id, everything buffered; resend creates the run."""
    dead = f"http://127.0.0.1:{_free_port()}"
    tracker = Tracker(TrackingSpec(uri=dead, experiment="pending-test"), enabled=True,
                      run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.track.mlflow_tracker"):
        run_id = tracker.start("late", {"a": {"b": 1}}, {"kind": "unit"})
        for step in range(1, 6):
            tracker.log_metrics({"m": float(step)}, step)
        tracker.set_tags({"t": "v"})
        tracker.finish("FINISHED")
    assert run_id is not None and run_id.startswith("pending-")
    assert sum(OUTAGE in r.getMessage() for r in caplog.records) == 1
    (tmp_path / "run_info.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    records = read_records(tmp_path / BUFFER_NAME)
    for r in records:  # the records name the live server from now on
        r["uri"] = live.uri
    (tmp_path / BUFFER_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))

    sent = _resend(tmp_path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    real_id = json.loads((tmp_path / "run_info.json").read_text())["mlflow_run_id"]
    assert not real_id.startswith("pending-")
    client = _client(live.uri)
    run = client.get_run(real_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late"
    assert run.data.params["a.b"] == "1" and run.data.tags["t"] == "v"
    assert [m.step for m in client.get_metric_history(real_id, "m")] == [1, 2, 3, 4, 5]
    # A resume of this run directory continues the created run, not a new one.
    resumed = Tracker(TrackingSpec(uri=live.uri, experiment="pending-test"), enabled=True,
                      run_dir=tmp_path)
    assert resumed.start("late", {}, {}, resume_run_id=run_id) == real_id
    resumed.finish("FINISHED")
