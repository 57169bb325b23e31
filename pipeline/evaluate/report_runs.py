"""Runs read back from MLflow for a report: by experiment, by study (its parent run), or both.

Only finished runs count. Each run is grouped by its **row** (the study's ``study_label`` tag:
row name + grid point, else the method label of its params), its **method** label (for the
published numbers), its teacher→student **pair** and its **seed** (params). Where one row, pair and
seed has several finished runs (a run repeated in another study), the latest counts. The
**teacher** row holds the runs the students name in their ``teacher_run_id`` lineage tag, and
evaluation runs of a teacher (``launch/evaluate.py --net teacher``: tag ``net_role=teacher``).

This module reads MLflow through ``mlflow`` itself (any tracking URI); the default URI is the
caller's (``tools/report.py`` takes the project's from ``pipeline.track``).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.errors import ConfigError
from pipeline.evaluate.labels import method_from_params, method_label

TEACHER = "teacher"


@dataclass
class RunRecord:
    run_id: str
    name: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    row: str = ""
    method: str = ""
    teacher: str | None = None
    student: str = ""  # "" in a teacher row: the teacher of every pair with that teacher
    seed: str = ""
    plots: list[Path] = field(default_factory=list)  # PNGs of its ``plots/`` artifacts

    @property
    def eval_splits(self) -> list[str]:
        text = self.params.get("data.eval_splits", "[]")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return []
        return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _arch(value: str | None) -> str | None:
    return None if value in (None, "", "None") else value


def record(run: Any, teacher_row: bool = False) -> RunRecord:
    """An ``mlflow.entities.Run`` as a RunRecord with its grouping keys."""
    params, tags = dict(run.data.params), dict(run.data.tags)
    rec = RunRecord(run.info.run_id, run.info.run_name or run.info.run_id,
                    int(run.info.start_time or 0), params, tags, dict(run.data.metrics))
    rec.student = params.get("model.arch", "?")
    rec.teacher = _arch(params.get("teacher.arch"))
    rec.seed = tags.get("study_seed") or params.get("seed", "?")
    if teacher_row:  # the teacher's own training run: its network is the teacher of a pair
        rec.row = rec.method = TEACHER
        rec.teacher, rec.student = rec.student, ""
        return rec
    if tags.get("net_role") == "teacher":  # scored with a student's config: that pair
        rec.row = rec.method = TEACHER
        return rec
    rec.method = tags.get("study_method") or method_label(method_from_params(params))
    rec.row = tags.get("study_label") or rec.method
    return rec


def _experiment_ids(client: Any, names: Sequence[str]) -> list[str]:
    if not names:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"--experiment: {name!r}: no such MLflow experiment; known: {known}")
        ids.append(exp.experiment_id)
    return ids


def _search(client: Any, exp_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_parent(client: Any, exp_ids: list[str], study: str) -> Any:
    """The latest parent run of study ``study`` (a run name or a run id)."""
    try:
        return client.get_run(study)
    except Exception:  # not a run id: a study name
        pass
    found = _search(client, exp_ids, f"tags.study_name = '{study}'")
    found = found or [r for r in _search(client, exp_ids, "tags.study = 'true'")
                      if r.info.run_name == study]
    if not found:
        raise ConfigError(f"--study: {study!r}: no study parent run of that name or id in "
                          f"the experiments searched")
    return found[-1]


def read_runs(client: Any, experiments: Sequence[str] = (), study: str | None = None,
              with_teachers: bool = True) -> list[RunRecord]:
    """Finished runs of a study (its children) or of experiments, plus their teachers' runs."""
    exp_ids = _experiment_ids(client, experiments)
    flt = "attributes.status = 'FINISHED'"
    if study:
        parent = find_parent(client, exp_ids, study)
        # the children of a study may be in other experiments than the parent (one per config)
        runs = _search(client, exp_ids,
                       f"{flt} and tags.mlflow.parentRunId = '{parent.info.run_id}'")
    else:
        runs = [r for r in _search(client, exp_ids, flt) if r.data.tags.get("study") != "true"
                and not (r.data.tags.get("run_kind") == "evaluation"
                         and r.data.tags.get("net_role") != "teacher")]
    records = [record(r) for r in runs]
    if with_teachers:
        for tid in dict.fromkeys(r.tags["teacher_run_id"] for r in records
                                 if r.tags.get("teacher_run_id")):
            try:
                run = client.get_run(tid)
            except Exception:  # a teacher run from another store: no teacher row for it
                continue
            if run.info.status == "FINISHED":
                records.append(record(run, teacher_row=True))
    return latest_per_seed(records)


def latest_per_seed(records: list[RunRecord]) -> list[RunRecord]:
    """One run per (row, pair, seed): the latest started."""
    keep: dict[tuple, RunRecord] = {}
    for rec in sorted(records, key=lambda r: r.start_time):
        keep[(rec.row, rec.teacher, rec.student, rec.seed)] = rec
    return sorted(keep.values(), key=lambda r: r.start_time)


def fetch_plots(client: Any, rec: RunRecord, dest: Path, limit: int = 12) -> list[Path]:
    """Download the run's ``plots/**.png`` artifacts (if any) into ``dest``."""
    try:
        todo, found = ["plots"], []
        while todo and len(found) < limit:
            for info in client.list_artifacts(rec.run_id, todo.pop()):
                if info.is_dir:
                    todo.append(info.path)
                elif info.path.lower().endswith(".png"):
                    found.append(info.path)
    except Exception:  # no artifacts, or a store that cannot list them: a report without plots
        return []
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in found[:limit]:
        out.append(Path(client.download_artifacts(rec.run_id, path, str(dest))))
    rec.plots = out
    return out
