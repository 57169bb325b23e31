"""Tracking calls that the MLflow server did not take: kept, written down, and replayed later.

Each call is one JSON record (one line of ``<run_dir>/mlflow_buffer.jsonl``) holding everything
needed to send it again: the tracking URI, the run id, and the payload (metrics keep their original
timestamps, so sending a record twice stores nothing twice: MLflow drops exact duplicates).

    {"op": "metrics", "uri": ..., "run_id": ..., "metrics": [[key, value, timestamp_ms, step], ...]}
    {"op": "params" | "tags", ..., "params" | "tags": {key: value}}
    {"op": "artifact", ..., "path": "/abs/file", "artifact_path": null}
    {"op": "inputs", ..., "datasets": [{name, digest, source, source_type, schema, profile,
     context}]}                                         (dataset inputs, conventions.dataset_input)
    {"op": "model", ..., "state": "/abs/student.pt", "arch": ..., "num_classes": ...,
     "image_size": ..., "name": "model"}                (a logged model, model_log.log_network)
    {"op": "model_inputs", ..., "source_run_id": ...}   (that run's logged models as inputs)
    {"op": "status", ..., "status": "RUNNING"}             (a resumed run)
    {"op": "terminated", ..., "status": "FINISHED", "end_time": ms}
    {"op": "create_run", ..., "run_id": "pending-<hex>", "experiment": ..., "run_name": ...,
     "tags": {...}, "start_time": ms, "artifact_location": ...}   (the server was down at start)

A run that could not even be created gets a ``pending-`` id; replaying its ``create_run`` record
creates it, and the ids it was given are kept in ``<run_dir>/mlflow_run_ids.json`` so a later
resume of the same run directory continues the created run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BUFFER_NAME = "mlflow_buffer.jsonl"
IDS_NAME = "mlflow_run_ids.json"
PENDING = "pending-"
_CHUNK = {"params": 100, "metrics": 1000}  # MLflow's log_batch limits

# Fail fast on an unreachable server: MLflow's defaults retry 7 times with exponential backoff and
# wait 120 s per request, i.e. minutes of a stalled training step; the buffer keeps what fails.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def fail_fast_http() -> None:
    """Set HTTP_DEFAULTS in this process's environment (values already there win)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class OutageBuffer:
    """Records of calls the server missed, in memory and appended to a JSONL file (if a path)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def __len__(self) -> int:
        return len(self.records)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # the last line, cut short by a crash mid-write: nothing lost yet
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({err})") from err
    return out


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with ``records`` (removes it when there are none)."""
    records = list(records)
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def load_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def save_ids(run_dir: Path, ids: dict[str, str]) -> None:
    if ids:
        (run_dir / IDS_NAME).write_text(json.dumps({**load_ids(run_dir), **ids}, indent=2))


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with that artifact location) if missing, and
    marked as a model-training experiment unless it already has a kind (conventions.py)."""
    from pipeline.track.conventions import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another run: use it
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _log_inputs(client: Any, run_id: str, datasets: list[dict[str, Any]]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"],
                             d.get("schema"), d.get("profile")),
                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
        for d in datasets
    ]
    client.log_inputs(run_id, datasets=inputs)


def _log_model_inputs(client: Any, run_id: str, source_run_id: str) -> None:
    """The logged models of run ``source_run_id`` (a teacher's training run, an evaluated run)
    as model inputs of ``run_id``: MLflow 3's lineage between runs. Nothing when that run is
    not in this tracking store or has no logged model."""
    from mlflow.entities import LoggedModelInput
    from mlflow.exceptions import MlflowException

    try:
        source = client.get_run(source_run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return
        raise
    outputs = source.outputs.model_outputs if source.outputs is not None else []
    if outputs:
        client.log_inputs(run_id, models=[LoggedModelInput(o.model_id) for o in outputs])


def apply_record(client: Any, record: dict[str, Any], ids: dict[str, str]) -> None:
    """Send one record through ``client`` (an ``MlflowClient``); ``ids`` maps pending run ids."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    run_id = ids.get(record["run_id"], record["run_id"])
    if op == "create_run":
        exp = experiment_id(client, record["experiment"], record.get("artifact_location"))
        run = client.create_run(exp, start_time=record.get("start_time"), tags=record["tags"],
                                run_name=record.get("run_name"))
        ids[record["run_id"]] = run.info.run_id
        return
    if run_id.startswith(PENDING):
        raise ValueError(f"run {run_id} was never created: its create_run record is missing")
    if op == "params":
        items = [Param(k, str(v)) for k, v in record["params"].items()]
        for i in range(0, len(items), _CHUNK["params"]):
            client.log_batch(run_id, params=items[i : i + _CHUNK["params"]])
    elif op == "metrics":
        items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(items), _CHUNK["metrics"]):
            client.log_batch(run_id, metrics=items[i : i + _CHUNK["metrics"]])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif op == "inputs":
        _log_inputs(client, run_id, record["datasets"])
    elif op == "model":
        from pipeline.track.model_log import log_network

        log_network(client, record, run_id)
    elif op == "model_inputs":
        _log_model_inputs(client, run_id, record["source_run_id"])
    elif op == "status":
        client.update_run(run_id, status=record["status"])
    elif op == "terminated":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown tracking record op {op!r}: {record}")


def replay(
    records: list[dict[str, Any]], uri: str | None = None, ids: dict[str, str] | None = None
) -> tuple[int, list[dict[str, Any]], Exception | None]:
    """Send ``records`` in order; stops at the first failure.

    Returns (records sent, records left with pending ids resolved, the error or None).
    ``uri`` overrides each record's own tracking URI.
    """
    from mlflow.tracking import MlflowClient

    ids = ids if ids is not None else {}
    clients: dict[str, Any] = {}
    for i, record in enumerate(records):
        target = uri or record["uri"]
        client = clients.get(target) or clients.setdefault(target, MlflowClient(target))
        try:
            apply_record(client, record, ids)
        except Exception as err:
            left = [{**r, "run_id": ids.get(r["run_id"], r["run_id"])} for r in records[i:]]
            return i, left, err
    return len(records), [], None
