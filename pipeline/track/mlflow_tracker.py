"""MLflow tracking: params, metrics at the global step, artifacts and lineage tags.

Only the main process logs. The embedded default is ``sqlite:///<cwd>/mlruns.db`` with artifacts in
``<cwd>/mlartifacts`` (MLflow 3.17's plain file store refuses to run without an opt-in, and its
default artifact location is relative to the current directory); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` points runs at a server instead. A resumed run continues the same MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.config.schema import TrackingSpec


def default_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


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


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin wrapper over ``MlflowClient`` for one run; every call is a no-op when disabled."""

    def __init__(self, spec: TrackingSpec, enabled: bool) -> None:
        self.spec = spec
        self.enabled = enabled and spec.enabled
        self.run_id: str | None = None
        self.client = None
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.uri = resolve_uri(spec)
            self.client = MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self) -> str:
        assert self.client is not None
        exp = self.client.get_experiment_by_name(self.spec.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            folder = Path(self.spec.artifact_dir or Path.cwd() / "mlartifacts").resolve()
            location = folder.as_uri()
        try:
            return self.client.create_experiment(self.spec.experiment, artifact_location=location)
        except Exception:  # created meanwhile by another run: use it
            exp = self.client.get_experiment_by_name(self.spec.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Start (or resume) the run; returns its id."""
        if not self.enabled:
            return None
        assert self.client is not None
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.client.set_tag(resume_run_id, "resumed", "true")
            return self.run_id
        all_tags = {"git_commit": git_commit(), **self.spec.tags, **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        try:
            self.client.log_batch(self.run_id, metrics=items)  # type: ignore[union-attr]
        except Exception as err:  # a tracking outage must not kill training
            warnings.warn(f"MLflow could not log metrics at step {step}: {err}", stacklevel=2)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)  # type: ignore[union-attr]

    def log_artifact(self, path: Path) -> None:
        if self.enabled and self.run_id and path.exists():
            self.client.log_artifact(self.run_id, str(path))  # type: ignore[union-attr]

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)  # type: ignore[union-attr]
