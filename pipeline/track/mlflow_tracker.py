"""MLflow tracking: params, metrics at the global step, artifacts and lineage tags.

Only the main process logs. The embedded default is ``sqlite:///<cwd>/mlruns.db`` with artifacts in
``<cwd>/mlartifacts`` (MLflow 3.17's plain file store refuses to run without an opt-in, and its
default artifact location is relative to the current directory); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` points runs at a server instead. A resumed run continues the same MLflow run.

New runs carry MLflow's own source, git and note tags and their splits as dataset inputs, and
experiments are created as model-training experiments (``pipeline.track.conventions``); the
trained network becomes the run's MLflow model (``pipeline.track.model_log``).

A tracking outage never stops training: every call (run creation, params, metrics, tags, artifacts,
dataset inputs, the model, status) that fails is kept in memory and appended to
``<run_dir>/mlflow_buffer.jsonl`` (``pipeline.track.buffer``), with one warning per outage. While
the server is down, calls go straight to the buffer and the server is tried again every
``retry_after_s``; what it missed is sent later by ``python tools/mlflow_resend.py <run_dir>``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config.schema import TrackingSpec
from pipeline.track.buffer import (
    BUFFER_NAME,
    PENDING,
    OutageBuffer,
    apply_record,
    experiment_id,
    fail_fast_http,
    load_ids,
)
from pipeline.track.conventions import UI_QUERY, git_commit, source_tags

log = logging.getLogger(__name__)

def default_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


@contextmanager
def sqlite_creation_lock(uri: str) -> Iterator[None]:
    """For a ``sqlite:`` URI, hold an exclusive lock on ``<database>.lock`` while MLflow opens the
    store: the client creates and migrates a new database's tables when it opens it, and two
    processes doing that at once (runs started side by side on a fresh clone) fail with an
    alembic error. Any other URI: nothing."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    lock = Path(path + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_uri(spec: TrackingSpec) -> str:
    return spec.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"data": {"batch_size": 64}} → {"data.batch_size": "64"} (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """A thin wrapper over ``MlflowClient`` for one run; every call is a no-op when disabled.

    ``run_dir`` holds the outage buffer; when omitted it is taken from the ``run_dir`` tag given
    to :meth:`start` (the trainer sets it), else the buffer lives in memory only.
    """

    def __init__(
        self,
        spec: TrackingSpec,
        enabled: bool,
        run_dir: Path | None = None,
        retry_after_s: float = 60.0,
    ) -> None:
        self.spec = spec
        self.enabled = enabled and spec.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.client = None
        self.run_dir = run_dir
        self.retry_after_s = retry_after_s
        self.buffer = OutageBuffer(None)
        self.outages = 0
        self._offline_until: float | None = None  # monotonic time of the next try while offline
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.uri = resolve_uri(spec)
            if self.uri.startswith(("http://", "https://")):
                fail_fast_http()
            with sqlite_creation_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)

    # -- outage handling ----------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return self._offline_until is not None

    def _resend_hint(self) -> str:
        where = self.run_dir if self.run_dir is not None else "<run_dir>"
        return f"python tools/mlflow_resend.py {where}"

    def _go_offline(self, op: str, err: Exception) -> None:
        self._offline_until = time.monotonic() + self.retry_after_s
        self.outages += 1
        kept = self.buffer.path or "memory only: no run directory"
        log.warning(
            "WARNING: MLflow at %s failed (%s: %s; during %s). Training continues; tracking calls "
            "are kept in %s and the server is retried every %.0f s. Once it is back, send what it "
            "missed with: %s",
            self.uri, type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "",
            op, kept, self.retry_after_s, self._resend_hint(),
        )

    def _send(self, op: str, **payload: Any) -> None:
        """Send one call, or buffer it when the server fails (or is known to be down)."""
        assert self.run_id is not None
        record = {"op": op, "uri": self.uri, "run_id": self.run_id, **payload}
        pending = self.run_id.startswith(PENDING)
        if pending or (self.offline and time.monotonic() < self._offline_until):  # type: ignore[operator]
            self.buffer.add(record)
            return
        try:
            apply_record(self.client, record, {})
        except Exception as err:  # an outage must not stop training: keep the call for later
            if not self.offline:
                self._go_offline(op, err)
            else:
                self._offline_until = time.monotonic() + self.retry_after_s
            self.buffer.add(record)
            return
        if self.offline:
            self._offline_until = None
            log.warning(
                "MLflow at %s answers again; %d earlier call(s) stay in %s until: %s",
                self.uri, len(self.buffer), self.buffer.path, self._resend_hint(),
            )

    # -- the run ------------------------------------------------------------------------------
    def _artifact_location(self) -> str | None:
        if self.uri.startswith(("http://", "https://", "databricks")):
            return None
        folder = Path(self.spec.artifact_dir or Path.cwd() / "mlartifacts").resolve()
        return folder.as_uri()

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        description: str | None = None,
    ) -> str | None:
        """Start (or resume) the run; returns its id (``pending-…`` if the server was down).

        A new run gets MLflow's source, git and user tags and ``description`` (default: the run
        name) as its note (``conventions.source_tags``) besides ``tags``."""
        if not self.enabled:
            return None
        assert self.client is not None
        if self.run_dir is None and tags.get("run_dir"):
            self.run_dir = Path(tags["run_dir"])
        if self.run_dir is not None:
            self.buffer = OutageBuffer(self.run_dir / BUFFER_NAME)
        if resume_run_id:
            if resume_run_id.startswith(PENDING) and self.run_dir is not None:
                resume_run_id = load_ids(self.run_dir).get(resume_run_id, resume_run_id)
            self.run_id = resume_run_id
            if resume_run_id.startswith(PENDING):
                log.warning(
                    "WARNING: MLflow run %s was never created (the server was down when it "
                    "started); its calls go to %s until: %s",
                    resume_run_id, self.buffer.path, self._resend_hint(),
                )
            self._send("status", status="RUNNING")
            self._send("tags", tags={"resumed": "true"})
            return self.run_id
        all_tags = {"git_commit": git_commit(), **source_tags(run_name, description or run_name),
                    **self.spec.tags, **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        start_time = now_ms()
        try:
            exp = experiment_id(self.client, self.spec.experiment, self._artifact_location())
            self.experiment_id = exp
            run = self.client.create_run(
                exp, start_time=start_time, tags=all_tags, run_name=run_name
            )
            self.run_id = run.info.run_id
        except Exception as err:  # created later by tools/mlflow_resend.py
            self._go_offline("create_run", err)
            self.run_id = f"{PENDING}{uuid.uuid4().hex}"
            self.buffer.add({
                "op": "create_run", "uri": self.uri, "run_id": self.run_id,
                "experiment": self.spec.experiment, "run_name": run_name, "tags": all_tags,
                "start_time": start_time, "artifact_location": self._artifact_location(),
            })
        self._send("params", params=flatten(params))
        return self.run_id

    def run_url(self) -> str | None:
        """The run's page in the UI of an HTTP tracking server (in its model-training view),
        else None."""
        if not (self.enabled and self.run_id and self.uri.startswith(("http://", "https://"))):
            return None
        if self.run_id.startswith(PENDING):
            return None
        exp = self.experiment_id
        if exp is None:
            try:
                exp = self.client.get_run(self.run_id).info.experiment_id
            except Exception:  # the server is gone: no link
                return None
        return f"{self.uri.rstrip('/')}/#/experiments/{exp}/runs/{self.run_id}?{UI_QUERY}"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self.run_id is None:
            return
        now = now_ms()
        self._send("metrics", metrics=[[k, float(v), now, int(step)] for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            self._send("tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id and path.exists():
            self._send("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        """Dataset inputs (``conventions.dataset_input`` records), buffered like every call."""
        if self.enabled and self.run_id and datasets:
            self._send("inputs", datasets=datasets)

    def log_model_inputs(self, source_run_id: str | None) -> None:
        """The logged models of run ``source_run_id`` (the teacher's training run, say) as model
        inputs of this run, MLflow 3's form of the lineage our ``teacher_run_id`` tag records."""
        if self.enabled and self.run_id and source_run_id and not source_run_id.startswith(
                PENDING):
            self._send("model_inputs", source_run_id=source_run_id)

    def log_model(self, state: Path, arch: str, num_classes: int, image_size: int,
                  name: str = "model") -> bool:
        """The network ``arch`` with the state dict file ``state`` as the run's MLflow model
        (``model_log.log_network``); True when logged now.

        Kept in the buffer when the server is down (the resend tool logs it from ``state``
        later). A failure while the server answers (the network cannot be exported, say) is
        reported once and the run goes on without the model.
        """
        if not (self.enabled and self.run_id):
            return False
        payload = {"state": str(Path(state).resolve()), "arch": arch,
                   "num_classes": int(num_classes), "image_size": int(image_size), "name": name}
        record = {"op": "model", "uri": self.uri, "run_id": self.run_id, **payload}
        if self.run_id.startswith(PENDING) or self.offline:
            self._send("model", **payload)
            return False
        try:
            apply_record(self.client, record, {})
            return True
        except Exception as err:  # an outage, or a network MLflow cannot take: never fatal
            if self._server_answers():
                log.warning("WARNING: %s could not be logged as an MLflow model (%s: %s); the "
                            "run has no logged model", state, type(err).__name__,
                            str(err).splitlines()[0][:300] if str(err) else "")
                return False
            self._go_offline("model", err)
            self.buffer.add(record)
            return False

    def _server_answers(self) -> bool:
        try:
            self.client.get_run(self.run_id)
            return True
        except Exception:
            return False

    def finish(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self.run_id):
            return
        self._send("terminated", status=status, end_time=now_ms())
        if len(self.buffer):
            log.warning(
                "WARNING: %d MLflow call(s) of run %s were not delivered (%d outage(s)); they are "
                "in %s; send them with: %s",
                len(self.buffer), self.run_id, self.outages, self.buffer.path, self._resend_hint(),
            )
