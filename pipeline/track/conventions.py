"""MLflow's own conventions for what our runs record, so its UI and tools read them.

- source and git tags (``mlflow.source.name`` / ``.type`` / ``.git.commit`` / ``.git.branch``,
  ``mlflow.user``, ``mlflow.runName``) and ``mlflow.note.content``, the run's one-line
  description (shown in the UI as the run's description);
- ``mlflow.experimentKind = custom_model_development`` on our experiments: the kind MLflow 3's UI
  writes itself when a user picks "model training" for an experiment, and reads to open it on its
  runs table instead of the GenAI view (traces). The tag and value are those of the UI bundled
  with MLflow 3.17 (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT``; the Python package defines no
  constant). MLflow 3.17.2's UI, though, takes the view from its own "GenAI | Model training"
  switch (remembered by the browser, GenAI by default) and ignores the tag while that switch is
  shown, so links we print carry ``UI_QUERY`` (``?workflowType=machine_learning``), which sets
  the switch to model training;
- dataset inputs: each split a run reads as an ``mlflow.data`` ``MetaDataset`` (no data is
  copied) with context ``training`` or ``evaluation``. Its digest is our dataset fingerprint
  (``DatasetIndex.fingerprint``, sha256) cut to the 36 characters MLflow's stores allow; the
  whole fingerprint, sample and class counts are in its profile, and the ``dataset_fingerprint``
  tag keeps it too.

Our own tags (``git_commit``, ``teacher_run_id``, ``dataset_fingerprint`` ...) stay; these are
set beside them.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "workflowType=machine_learning"  # MLflow 3.17 UI: the "Model training" view
DIGEST_CHARS = 36  # MAX_DATASET_DIGEST_SIZE of mlflow.utils.validation
TRAINING, EVALUATION = "training", "evaluation"
_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def source_tags(run_name: str, description: str) -> dict[str, str]:
    """The standard tags of a run started from this process's entry point."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    try:
        name = str(script.relative_to(_ROOT)) if script else "python"
    except ValueError:
        name = str(script)
    tags = {
        "mlflow.source.name": name,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "mlflow.runName": run_name,
        "mlflow.note.content": description,
    }
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def run_description(spec: Any, num_train: int | None = None) -> str:
    """One line: method, teacher → student, dataset (``RunSpec``)."""
    method = spec.method["name"]
    data = f"{spec.data.dataset} ({spec.data.train_split}"
    data += f", {num_train} samples)" if num_train is not None else ")"
    if spec.teacher is not None and spec.teacher.arch:
        return f"{method}: {spec.teacher.arch} → {spec.model.arch} on {data}"
    return f"{method}: {spec.model.arch} trained on {data}"


def dataset_input(index: Any, context: str, image_size: int | None = None) -> dict[str, Any]:
    """A ``DatasetIndex`` as a JSON-able dataset input (``buffer.apply_record`` op ``inputs``)."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    with warnings.catch_warnings():  # MLflow registers its local source twice and says so
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(index.root).resolve()) if index.root else ".")
    shape = (-1, 3, image_size, image_size) if image_size else (-1, 3, -1, -1)
    schema = Schema([TensorSpec(np.dtype(np.uint8), shape, "images"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    name = f"{index.kind}/{index.split}" + (f" ({index.selection})" if index.selection else "")
    ds = MetaDataset(source, name=name[:500], digest=index.fingerprint[:DIGEST_CHARS],
                     schema=schema)
    record = ds.to_dict()
    record["profile"] = json.dumps({"num_samples": len(index), "num_classes": index.num_classes,
                                    "fingerprint": index.fingerprint,
                                    "selection": index.selection or None})
    record["context"] = context
    return record


__all__ = ["DIGEST_CHARS", "EVALUATION", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "TRAINING",
           "UI_QUERY", "dataset_input", "git_commit", "run_description", "source_tags"]
