"""A study's cells: named rows × a grid of overrides, each cell run over several seeds.

Pure functions (no torch, no MLflow) used by ``tools/study.py``:

- a **row** is a name, a run config and the row's own overrides:
  ``NAME=CONFIG[:KEY=VALUE,KEY=VALUE...]`` (``parse_row``), or a bare config file, whose row name
  is the file's stem;
- a **grid** axis is ``KEY=V1,V2,...`` (``parse_grid``); several axes form their cartesian
  product, applied to every row;
- a **cell** is one row with one point of the grid (``plan_cells``); its name is the row name
  followed by ``-<key>=<value>`` for every grid axis (the key's last dotted part unless two axes
  share it), and, where several rows share a name (one method over several teacher-student
  pairs), the pair's config stem after ``@``.

Commas inside brackets or quotes do not separate values: ``--grid optim.milestones=[5,7],[6,7]``
has two values. Values are YAML, as for ``--set``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.errors import ConfigError

SAFE = re.compile(r"[^A-Za-z0-9._=+@-]+")


@dataclass(frozen=True)
class Row:
    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One table row of the study (before seeds): a row at one point of the grid."""

    name: str
    row: Row
    grid: tuple[tuple[str, str], ...] = ()  # (key, value text) per grid axis
    label: str = ""  # the row name plus the grid point: the row of the report

    @property
    def overrides(self) -> list[str]:
        """The cell's own overrides: the row's, then the grid point's."""
        return [*self.row.overrides, *(f"{k}={v}" for k, v in self.grid)]


@dataclass
class Study:
    rows: list[Row] = field(default_factory=list)
    grid: list[tuple[str, list[str]]] = field(default_factory=list)


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes: ``a,[1,2],"x,y"`` → 3 parts."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _key_value(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")) or not value.strip():
        raise ConfigError(f"{where}: expected dotted.key=value, found {text!r}")
    return key, value.strip()


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``method.alpha=1,10,50`` → ("method.alpha", ["1", "10", "50"])."""
    key, values = _key_value(text, "--grid")
    items = split_top(values)
    if any(not v for v in items):
        raise ConfigError(f"--grid: {key}: empty value in {values!r}; expected V1,V2,...")
    if len(set(items)) != len(items):
        raise ConfigError(f"--grid: {key}: a value is repeated in {values!r}")
    return key, items


def parse_row(text: str) -> Row:
    """``NAME=CONFIG[:KEY=VALUE,...]`` → Row (the config may not contain ``:``)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ConfigError(f"--row: expected NAME=CONFIG[:KEY=VALUE,...], found {text!r}")
    if SAFE.search(name):
        raise ConfigError(f"--row: {name!r}: a row name may use letters, digits and ._=+@- "
                          "only (it names run directories)")
    config, _, sets = rest.partition(":")
    overrides = tuple(f"{k}={v}" for k, v in
                      (_key_value(s, f"--row {name}") for s in split_top(sets) if s))
    return Row(name, config.strip(), overrides)


def config_row(config: str) -> Row:
    """A bare config on the command line: one row named by its file's stem."""
    return Row(Path(config).stem, config)


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def plan_cells(study: Study) -> list[Cell]:
    """Every (row, grid point), in row order then grid order (the first axis varies slowest)."""
    if not study.rows:
        raise ConfigError("study: no rows; give configs, --row NAME=CONFIG, or both")
    keys = [k for k, _ in study.grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: a key is given twice: {keys}")
    short = _short_keys(keys)
    shared = {r.name for r in study.rows if sum(o.name == r.name for o in study.rows) > 1}
    points = list(itertools.product(*(values for _, values in study.grid)))
    cells: list[Cell] = []
    for row in study.rows:
        for point in points:
            grid = tuple(zip(keys, point, strict=True))
            label = "-".join([row.name, *(f"{short[k]}={v}" for k, v in grid)])
            name = label + (f"@{Path(row.config).stem}" if row.name in shared else "")
            cells.append(Cell(SAFE.sub("_", name), row, grid, label))
    names = [c.name for c in cells]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"study: two cells are both named {n!r}; give the rows distinct "
                              "names (--row NAME=CONFIG)")
    return cells


def yaml_string(text: str) -> str:
    """A string as a YAML double-quoted scalar (JSON's escapes are YAML's), for ``--set``."""
    import json

    return json.dumps(text)


def cell_tags(study_name: str, cell: Cell, seed: int, method: str, pair: str) -> dict[str, str]:
    """The tags a study gives each run (as ``tracking.tags.*`` overrides), read back by the
    report to group runs: study, row, cell, seed, method, teacher→student pair, overrides."""
    return {
        "study": study_name,
        "study_row": cell.row.name,
        "study_cell": cell.name,
        "study_label": cell.label,
        "study_seed": str(seed),
        "study_method": method,
        "study_pair": pair,
        "study_config": cell.row.config,
        "study_overrides": "; ".join(cell.overrides),
        "study_grid": "; ".join(f"{k}={v}" for k, v in cell.grid),
    }
