"""Published numbers as data: one YAML file per paper table (``reports/published/*.yaml``).

A file::

    table: cid-table2                       # short id, shown in the report's references
    title: CIFAR-100 test top-1 (%)
    source: {paper: "Deng & Zhang, ... NeurIPS 2021", table: "Table 2"}
    match: {data.dataset: cifar100}         # run params every cell of this table requires
    columns:                                # id → the teacher→student pair and the metric
      r56-r20: {teacher: resnet56, student: resnet20, metric: "*/top1"}
      20%: {teacher: vgg13, student: vgg8, metric: "*/top1", match: {data.train_fraction: 0.2}}
    rows:                                   # our method label → {column id: value}
      kd: {r56-r20: [70.66, 0.24]}          # mean and std, or one number
      teacher: {r56-r20: 72.34}

Values are as the paper prints them, in the report's units (top-1 and top-5 in %, ECE in %, AURC
×10³). ``metric`` is matched against our MLflow metric key part by part (split on ``/``, each part a
shell pattern): ``*/top1`` is the top-1 of any split, ``transfer/transfer-stl10/probe/*/top1`` a
transfer probe. ``match`` values are compared with the run's params (numbers as numbers). Rows are
the labels of ``pipeline/evaluate/labels.py`` (``fitnet+kd``, ``cid``, ``vanilla``) and
``teacher``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.errors import ConfigError

TABLE_KEYS = {"table", "title", "source", "match", "columns", "rows"}
COLUMN_KEYS = {"teacher", "student", "metric", "match"}


@dataclass(frozen=True)
class Published:
    """One published number, with where it comes from."""

    value: float
    std: float | None
    table: str  # the file's ``table`` id
    source: str  # "paper, table"


@dataclass
class PublishedColumn:
    teacher: str | None
    student: str
    metric: str
    match: dict[str, Any] = field(default_factory=dict)


@dataclass
class PublishedTable:
    table: str
    title: str
    source: str
    path: Path
    match: dict[str, Any]
    columns: dict[str, PublishedColumn]
    rows: dict[str, dict[str, tuple[float, float | None]]]


def _fail(path: Path, key: str, found: Any, expected: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: expected {expected}, found {found!r}")


def _value(path: Path, key: str, raw: Any) -> tuple[float, float | None]:
    if isinstance(raw, bool):
        raise _fail(path, key, raw, "a number or [mean, std]")
    if isinstance(raw, int | float):
        return float(raw), None
    if (isinstance(raw, list) and len(raw) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)):
        return float(raw[0]), float(raw[1])
    raise _fail(path, key, raw, "a number or [mean, std]")


def _column(path: Path, name: str, raw: Any) -> PublishedColumn:
    key = f"columns.{name}"
    if not isinstance(raw, dict):
        raise _fail(path, key, raw, "a mapping {teacher, student, metric[, match]}")
    unknown = set(raw) - COLUMN_KEYS
    if unknown:
        raise _fail(path, f"{key}.{sorted(unknown)[0]}", raw[sorted(unknown)[0]],
                    f"one of the keys {sorted(COLUMN_KEYS)}")
    for need in ("student", "metric"):
        if not isinstance(raw.get(need), str) or not raw[need]:
            raise _fail(path, f"{key}.{need}", raw.get(need), "a non-empty string")
    match = raw.get("match") or {}
    if not isinstance(match, dict):
        raise _fail(path, f"{key}.match", match, "a mapping of run params")
    return PublishedColumn(raw.get("teacher"), raw["student"], raw["metric"], match)


def load_table(path: Path) -> PublishedTable:
    """Read and check one file; a ConfigError names the file, the key, the value and what is
    allowed."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", type(raw).__name__, "a mapping")
    unknown = set(raw) - TABLE_KEYS
    if unknown:
        bad = sorted(unknown)[0]
        raise _fail(path, bad, raw[bad], f"one of the keys {sorted(TABLE_KEYS)}")
    for need in ("table", "columns", "rows", "source"):
        if need not in raw:
            raise _fail(path, need, None, "a value (required)")
    src = raw["source"]
    if not isinstance(src, dict) or not src.get("paper") or not src.get("table"):
        raise _fail(path, "source", src, "{paper: ..., table: ...}")
    if not isinstance(raw["columns"], dict) or not raw["columns"]:
        raise _fail(path, "columns", raw["columns"], "a non-empty mapping")
    columns = {str(k): _column(path, str(k), v) for k, v in raw["columns"].items()}
    if not isinstance(raw["rows"], dict):
        raise _fail(path, "rows", raw["rows"], "a mapping of method label → {column: value}")
    rows: dict[str, dict[str, tuple[float, float | None]]] = {}
    for label, cells in raw["rows"].items():
        if not isinstance(cells, dict):
            raise _fail(path, f"rows.{label}", cells, "a mapping {column: value}")
        for col in cells:
            if str(col) not in columns:
                raise _fail(path, f"rows.{label}.{col}", col, f"a column of {sorted(columns)}")
        rows[str(label)] = {str(c): _value(path, f"rows.{label}.{c}", v)
                            for c, v in cells.items()}
    return PublishedTable(str(raw["table"]), str(raw.get("title", raw["table"])),
                          f"{src['paper']}, {src['table']}", Path(path),
                          dict(raw.get("match") or {}), columns, rows)


def load_tables(paths: Sequence[Path]) -> list[PublishedTable]:
    """Every ``*.yaml`` of the given files and folders, in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.yaml"))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"--published: {p}: no such file or folder")
    return [load_table(f) for f in files]


def key_matches(pattern: str, key: str) -> bool:
    """``*/top1`` matches ``test/top1`` but not ``probe/test/top1``: part by part."""
    pat, parts = pattern.split("/"), key.split("/")
    return len(pat) == len(parts) and all(fnmatch.fnmatchcase(k, p)
                                          for p, k in zip(pat, parts, strict=True))


def _same(param: str | None, want: Any) -> bool:
    if param is None:
        return False
    if isinstance(want, int | float) and not isinstance(want, bool):
        try:
            return float(param) == float(want)
        except ValueError:
            return False
    return str(param) == str(want)


def lookup(tables: Sequence[PublishedTable], method: str, teacher: str | None, student: str,
           metric: str, params: Mapping[str, str]) -> list[Published]:
    """The published numbers for our cell: method label, pair, metric key and one run's params.
    The teacher row is looked up with the pair of the students it taught."""
    found = []
    for t in tables:
        row = t.rows.get(method)
        if row is None or not all(_same(params.get(k), v) for k, v in t.match.items()):
            continue
        for col_id, (value, std) in row.items():
            col = t.columns[col_id]
            if (col.student == student and (col.teacher or None) == (teacher or None)
                    and key_matches(col.metric, metric)
                    and all(_same(params.get(k), v) for k, v in col.match.items())):
                found.append(Published(value, std, t.table, t.source))
    return found
