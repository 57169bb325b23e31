"""Resume safety: a run directory remembers the resolved config of every stretch of its training.

Files (written by the main process when tracking starts)::

    config.yaml                   the config the run uses now (its latest version)
    config_versions/v<N>.yaml     every version, never rewritten once the run has a checkpoint
    config_versions/history.json  [{version, from: {epoch, step}, changed: {key: [old, new]}, time}]

The rule, checked by :func:`check_resume` on every process before anything is built (no weights
are loaded and no data is indexed before it), when the run directory already holds a checkpoint
(``checkpoints/last.pt``) or a finished run (``metrics.json``):

- the resolved config equals the latest version, up to the keys in ``FREE_KEYS``: resume;
- ``model.arch``, ``teacher.arch`` or ``method.name`` differ: refused, always (the checkpoint holds
  the weights and state of other networks or another method; no override can load them);
- any other key differs: refused with the list of differing keys and both values, unless
  ``train.allow_config_change: true`` (e.g. ``--set train.allow_config_change=true``), which
  resumes and records the new config as version N+1 (the file, the history entry with the
  position it applies from, and in MLflow: the artifact ``config_versions/v<N+1>.yaml`` and the
  tags ``config_version`` and ``config_v<N+1>/<key>``). Nothing is ever overwritten silently.

``FREE_KEYS`` are the keys that cannot change what a run computes, only how it is run or
watched: ``run_dir`` (another spelling of this same directory), every ``tracking.*`` key,
``train.progress``, ``train.log_every_steps``, ``train.checkpoint_every_steps``,
``train.dist_timeout_s``, ``train.allow_config_change`` itself, ``data.ram_cache_mb`` (decoded
images kept in memory) and ``data.workers`` (loader processes: the batches are fixed by the
order, not by the workers). Path values (``data.root``,
weights, cache and neighbour files) are equal when they resolve to the same path.

Without a checkpoint the run starts afresh, and its config becomes version 1.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import dump_config
from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec

VERSIONS_DIR = "config_versions"
HISTORY = "history.json"
FREE_KEYS = ("run_dir", "tracking", "train.progress", "train.log_every_steps",
             "train.checkpoint_every_steps", "train.dist_timeout_s", "train.allow_config_change",
             "data.workers", "data.ram_cache_mb")
FIXED_KEYS = ("model.arch", "teacher.arch", "method.name")
PATH_KEYS = ("data.root", "data.neighbours", "data.ffcv_dir", "model.weights", "teacher.weights",
             "teacher.cache_dir")
_ABSENT = "<absent>"
# Keys added after run directories existed, with the value that reproduces what the code did
# before them: a config written then (without the key) matches a new one holding that value.
ADDED_KEYS = {"data.rotations": 1}


@dataclass
class ResumePlan:
    """What :func:`record_config` writes: the version this run continues or starts, and, for
    a new version, what changed (key → (old, new))."""

    text: str
    version: int
    new_version: bool
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} → {"optim.lr": 0.1}; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if old == _ABSENT and key in ADDED_KEYS and new == ADDED_KEYS[key]:
        return True
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return False


def config_diff(old_text: str, new_text: str) -> dict[str, tuple[Any, Any]]:
    """The keys (dotted) whose values differ between two resolved configs, except FREE_KEYS."""
    old = flatten(yaml.safe_load(old_text) or {})
    new = flatten(yaml.safe_load(new_text) or {})
    out = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if not _free(key) and not _same(key, a, b):
            out[key] = (a, b)
    return out


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / VERSIONS_DIR / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def latest_version(run_dir: Path) -> tuple[int, str | None]:
    """(number, YAML text) of the run directory's latest config version; (0, None) if none.
    A run directory from before versions were kept counts its ``config.yaml`` as version 1."""
    history = _history(run_dir)
    if history:
        n = int(history[-1]["version"])
        return n, (run_dir / VERSIONS_DIR / f"v{n}.yaml").read_text()
    legacy = run_dir / "config.yaml"
    return (1, legacy.read_text()) if legacy.is_file() else (0, None)


def _has_progress(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.pt").is_file() or (run_dir / "metrics.json").is_file()


def _shown(value: Any) -> str:
    return value if value == _ABSENT else repr(value)


def check_resume(spec: RunSpec, run_dir: Path) -> ResumePlan:
    """The plan for this run directory, or a ConfigError (see the module docstring)."""
    text = dump_config(spec)
    if not _has_progress(run_dir):
        return ResumePlan(text, 1, new_version=True)
    version, old_text = latest_version(run_dir)
    if old_text is None:  # a checkpoint without any config record: keep this one as v1
        return ResumePlan(text, 1, new_version=True)
    changed = config_diff(old_text, text)
    if not changed:
        return ResumePlan(text, version, new_version=False)
    where = f"{run_dir} (config version {version}: {run_dir / VERSIONS_DIR})"
    listed = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in changed.items())
    fixed = [k for k in changed if k in FIXED_KEYS]
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)}: the run directory {where} holds a checkpoint of another "
            f"network or method ({listed}); its weights cannot be loaded into this run: choose "
            "another run directory (--run-dir or run_dir) for this config")
    if not spec.train.allow_config_change:
        raise ConfigError(
            f"train.allow_config_change: resuming {where} with a different config: {listed}; "
            "resume with the config it was started with, use another run directory, or "
            "--set train.allow_config_change=true to continue with these changes (recorded as "
            f"config version {version + 1})")
    return ResumePlan(text, version + 1, new_version=True, changed=changed)


def record_config(run_dir: Path, plan: ResumePlan, position: tuple[int, int],
                  tracker: Any) -> None:
    """(Main process.) Write ``config.yaml`` and the version files; tell MLflow."""
    versions = run_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(plan.text)
    tracker.log_artifact(run_dir / "config.yaml")
    if not plan.new_version:
        return
    path = versions / f"v{plan.version}.yaml"
    path.write_text(plan.text)
    epoch, step = position
    history = [h for h in _history(run_dir) if int(h["version"]) < plan.version]
    history.append({"version": plan.version, "from": {"epoch": epoch, "step": step},
                    "changed": {k: list(v) for k, v in plan.changed.items()},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (versions / HISTORY).write_text(json.dumps(history, indent=1, default=str))
    tracker.log_artifact(path, artifact_path=VERSIONS_DIR)
    tags = {"config_version": str(plan.version)}
    if plan.changed:
        tags[f"config_v{plan.version}/from"] = f"epoch {epoch + 1} step {step}"
        tags.update({f"config_v{plan.version}/{k}": str(b)[:5000]
                     for k, (_, b) in plan.changed.items()})
    tracker.set_tags(tags)
