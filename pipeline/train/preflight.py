"""What ``launch/train.py --dry-run`` checks of the real run besides building it, and what not.

A dry run builds the whole run and takes two steps on synthetic data, so it proves the config
builds, not that the real run will start. :func:`preflight` adds the checks that are cheap
without reading the dataset: each path the run opens exists, each split folder is there, the
class count of the data (class folders, ``wnids.txt``, or the fixed count of CIFAR/STL-10)
agrees with ``data.num_classes``, and each weights file fits its arch with that class count.
Every finding is one of:

- ``ok``: checked and fine;
- ``missing``: the path is not on this machine (a real run here would stop at it, a run where
  the data is would not): data root, weights file, torchvision weights not in the hub cache;
- ``error``: the config contradicts the files that are there (a split folder missing from the
  data root, another class count, weights of another network): the dry run exits 2;
- ``not checked``: what a dry run never checks (listed with the value it would have used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config.layouts import layout_hint
from pipeline.config.schema import RunSpec
from pipeline.data.index import resolve_root

Status = Literal["ok", "missing", "error", "not checked"]
FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}
FILE_DATASETS = ("imagefolder", "demo", "tiny_imagenet")


@dataclass
class Finding:
    status: Status
    key: str
    detail: str

    def line(self) -> str:
        return f"  {self.status.upper():<11} {self.key}: {self.detail}"


def _class_count(spec: RunSpec, root: Path) -> int | None:
    """The data's class count from what is cheap to read, or None."""
    d = spec.data
    if d.dataset in FIXED_CLASSES:
        return FIXED_CLASSES[d.dataset]
    if d.dataset == "tiny_imagenet":
        wnids = root / "wnids.txt"
        if not wnids.is_file():
            return None
        return sum(1 for w in wnids.read_text().splitlines() if w.strip())
    train = root / d.train_split
    if d.dataset in ("imagefolder", "demo") and train.is_dir():
        with os.scandir(train) as entries:
            return sum(1 for e in entries if e.is_dir() and not e.name.startswith("."))
    return None


def _data(spec: RunSpec) -> tuple[list[Finding], int | None]:
    d = spec.data
    if d.dataset == "synthetic":
        return [Finding("ok", "data.root", "synthetic data: no files")], d.num_classes or 10
    root = resolve_root(d.root)
    if not root.is_dir():
        return [Finding("missing", "data.root", f"directory not found: {root}; "
                        f"{layout_hint(d.dataset)}"),
                Finding("not checked", "data.num_classes / splits",
                        f"without the data: splits {[d.train_split, *d.eval_splits]}, "
                        f"classes {d.num_classes or 'from the data'}")], d.num_classes or None
    found = [Finding("ok", "data.root", f"{root} exists")]
    if d.dataset in FILE_DATASETS:
        for split in [d.train_split, *d.eval_splits]:
            key = "data.train_split" if split == d.train_split else "data.eval_splits"
            there = (root / split).is_dir()
            detail = f"{root / split} " + ("exists" if there else
                                           f"not found ({layout_hint(d.dataset)})")
            found.append(Finding("ok" if there else "error", key, detail))
    count = _class_count(spec, root)
    if count is None:
        found.append(Finding("not checked", "data.num_classes",
                             f"class count unknown without the training split; "
                             f"configured {d.num_classes or 'from the data'}"))
    elif d.num_classes and d.num_classes != count:
        found.append(Finding("error", "data.num_classes",
                             f"{d.num_classes} configured, the data at {root} has {count} classes"))
    else:
        found.append(Finding("ok", "data.num_classes", f"{count} classes"))
    return found, d.num_classes or count


def _weights(spec: RunSpec, section: str, num_classes: int | None) -> list[Finding]:
    """A weights file exists (or torchvision's is in the hub cache) and fits its arch."""
    from pipeline.models import build_model
    from pipeline.models.weights import first_mismatch, read_state_dict

    net = spec.model if section == "model" else spec.teacher
    if net is None or not net.weights or not net.arch:
        return []
    key, source = f"{section}.weights", net.weights
    if source.startswith("torchvision:"):
        return [_torchvision_cached(key, net.arch, source)]
    path = Path(source).expanduser()
    if not path.is_file():
        return [Finding("missing", key, f"file not found: {path.resolve()}")]
    try:
        state = read_state_dict(path)
    except (OSError, ValueError) as err:
        return [Finding("error", key, str(err).removeprefix("weights: "))]
    classes, note = num_classes, ""
    if classes is None:  # the data is not here: take the file's own classifier size
        last = [t for t in state.values() if t.dim() == 2]
        classes, note = (int(last[-1].shape[0]) if last else 10), " (the file's class count)"
    mismatch = first_mismatch(build_model(net.arch, classes).state_dict(), state)
    if mismatch:
        return [Finding("error", key, f"{path} does not fit {section}.arch {net.arch!r} with "
                        f"{classes} classes{note}: first mismatch: {mismatch}")]
    return [Finding("ok", key, f"{path} fits {section}.arch {net.arch!r} ({classes} classes"
                    f"{note})")]


def _torchvision_cached(key: str, arch: str, source: str) -> Finding:
    import torchvision

    from pipeline.models.weights import hub_checkpoint_path

    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[source.split(":", 1)[1]]
    except (ValueError, KeyError) as err:
        return Finding("error", key, f"{source!r} is not a torchvision weights name for "
                       f"{arch!r}: {err}")
    path = hub_checkpoint_path(weights.url)
    if path.is_file():
        return Finding("ok", key, f"{source} is in the torch hub cache ({path})")
    return Finding("missing", key, f"{source} is not in the torch hub cache: a real run "
                   f"downloads {weights.url} to {path}; offline, place that file there")


def _paths(spec: RunSpec) -> list[Finding]:
    out = []
    t = spec.teacher
    if t is not None and t.source == "cached" and t.cache_dir:
        there = (resolve_root(t.cache_dir) / "manifest.json").is_file()
        out.append(Finding("ok" if there else "missing", "teacher.cache_dir",
                           f"{resolve_root(t.cache_dir)} " + ("holds a cache manifest" if there
                           else "holds no cache (write it with launch/cache_teacher.py)")))
    heads = spec.method.get("teacher_heads")
    if heads:  # SSKD's / HSAKD's teacher heads, written by the teacher-phase run
        path = resolve_root(heads)
        out.append(Finding("ok" if path.is_file() else "missing", "method.teacher_heads",
                           f"{path} " + ("exists (its fit to the teacher is checked at start)"
                                         if path.is_file() else "not found (train it with "
                                         f"method {spec.method['name']}.teacher)")))
    if spec.data.sampler == "coss" and spec.data.neighbours:
        path = resolve_root(spec.data.neighbours)
        out.append(Finding("ok" if path.is_file() else "missing", "data.neighbours",
                           f"{path} " + ("exists" if path.is_file() else
                                         "not found (write it with launch/neighbours.py)")))
    return out


def _not_checked(spec: RunSpec) -> list[Finding]:
    d = spec.data
    out = [
        Finding("not checked", "images", f"that every file of {d.dataset} at {d.root} decodes "
                "(a real run skips unreadable files and lists them in bad_samples.json)"),
        Finding("not checked", "tracking", f"the MLflow store ({spec.tracking.uri or 'default'})"
                "; the dry run does not track"),
    ]
    if spec.teacher is not None and spec.teacher.source == "cached":
        out.append(Finding("not checked", "teacher.cache_dir", "the cache's manifest against "
                           "this run and its checksums (a real run refuses a mismatch; checksums "
                           "on first read; launch/cache_teacher.py --verify checks them all)"))
    if d.backend != "torchvision":
        out.append(Finding("not checked", "data.backend", f"{d.backend!r}: the dry run reads "
                           "synthetic data with the torchvision loader"))
    return out


def preflight(spec: RunSpec) -> list[Finding]:
    """The checks of the module docstring for the real run ``spec`` describes."""
    found, classes = _data(spec)
    found += _weights(spec, "model", classes)
    found += _weights(spec, "teacher", classes)
    return found + _paths(spec) + _not_checked(spec)


def report(findings: list[Finding]) -> str:
    order = ("error", "missing", "ok", "not checked")
    lines = [f.line() for s in order for f in findings if f.status == s]
    return "checks of the real run (launch/train.py --dry-run):\n" + "\n".join(lines)
