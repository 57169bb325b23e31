"""The teacher cache on disk: manifest, array layout, chunks, completion markers, checksums.

A cache is a directory::

    manifest.json          what was cached, from what, and how (written last, atomically)
    logits.npy             (K·N, C) fp16: full logits of (view, sample) at row view·N + index
    logits_topk_p.npy      (K·N, k) fp16 and logits_topk_i.npy (K·N, k) int16/int32, instead of
                           logits.npy when ``teacher.cache_topk`` = k > 0 (see ``topk.py``)
    embedding.npy          (K·N, D) fp16: pooled penultimate vector
    feats_<s>.npy          (K·N, C_s, H_s, W_s) fp16: stage map s (``Net.stage_info`` index),
                           only the stages the method reads (``stages`` in the manifest)
    eval_<name>.npy        (N, ...) the same arrays for the deterministic eval view of every
                           TRAIN sample (``teacher.cache_eval_view``; embedding at least)
    done/v<v>_c<c>.json    completion marker of chunk c of view v (``eval_c<c>.json``: eval view)

Every array is a standard ``.npy`` file, preallocated at full size before any row is written
and memory-mapped by writers (mode r+) and readers (mode r). A chunk is ``chunk`` consecutive
samples of one view; its rows are contiguous in every array of its group, so a chunk's bytes
are one slice per array. Chunk c of view v (the eval view counts as view K) belongs to process
``(v·chunks + c) mod P``: ranks write disjoint rows and no merge step is needed. A chunk is
complete when its marker exists; the marker, written atomically after the arrays are flushed,
holds the sha256 of the chunk's bytes in every array and the id of the manifest it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT_NAME = "kd-teacher-cache"
FORMAT_VERSION = 2  # 2: stage maps of the selected stages only, listed in ``stages``
MANIFEST = "manifest.json"
DONE_DIR = "done"
EVAL_PREFIX = "eval_"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Unit(NamedTuple):
    """One chunk of one view: the unit of work, of completion and of checksums.

    ``view`` is a training view 0..K-1, or -1 for the deterministic eval view.
    """

    view: int
    chunk: int

    @property
    def key(self) -> str:
        return f"eval_c{self.chunk}" if self.view < 0 else f"v{self.view}_c{self.chunk}"

    @property
    def group(self) -> str:
        return "eval" if self.view < 0 else "train"


@dataclass
class ArraySpec:
    """One array file: its group (``train``: K·N rows, ``eval``: N rows), dtype, row shape."""

    group: str
    dtype: str
    row_shape: list[int]

    def file(self, name: str) -> str:
        return f"{name}.npy"


@dataclass
class Manifest:
    """Everything a reader checks a cache against, and the layout of its arrays."""

    teacher: dict[str, Any]  # arch, weights, sha256, num_classes, preact
    dataset: dict[str, Any]  # fingerprint, kind, split, num_samples
    plan: dict[str, Any]  # AugPlan.to_dict() of the training views
    eval_transform: dict[str, Any] | None  # EvalTransform fields when the eval view is cached
    normalize: dict[str, Any]  # mean, std the teacher's inputs were normalised with
    views: int  # K training views per sample (0: no training views cached)
    eval_view: bool
    chunk: int  # samples per chunk
    fields: list[str]  # TeacherOutput fields held: logits, embedding, feats
    stages: list[int]  # stage indices of the feats_<s> arrays (empty without feats)
    logits: dict[str, Any] | None  # {"mode": "full"} or {"mode": "topk", "k", "temperature"}
    arrays: dict[str, ArraySpec]
    precision: str  # what the teacher ran in: fp32, bf16, fp16
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") == FORMAT_NAME and d.get("version") == 1:
            raise ValueError(
                f"{where}: a cache of format version 1 (every stage map; written before stage "
                "selection): rewrite it with launch/cache_teacher.py into an empty directory")
        if d.get("format") != FORMAT_NAME or d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: expected a {FORMAT_NAME} manifest of version {FORMAT_VERSION}, found "
                f"format {d.get('format')!r} version {d.get('version')!r}"
            )
        d = dict(d)
        d["arrays"] = {k: ArraySpec(**v) for k, v in d["arrays"].items()}
        try:
            return cls(**d)
        except TypeError as err:
            raise ValueError(f"{where}: unexpected manifest keys: {err}") from err

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str]) -> Manifest:
        path = Path(cache_dir) / MANIFEST
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: expected JSON, found: {err}") from err

    def save(self, cache_dir: str | os.PathLike[str]) -> None:
        atomic_write_text(Path(cache_dir) / MANIFEST, self.to_json())

    @property
    def id(self) -> str:
        """sha256 of the canonical manifest: markers name it, so no stale marker counts."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # -- layout -----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.dataset["num_samples"])

    @property
    def chunks_per_view(self) -> int:
        return -(-self.num_samples // self.chunk)

    def group_rows(self, group: str) -> int:
        return self.views * self.num_samples if group == "train" else self.num_samples

    def array_shape(self, name: str) -> tuple[int, ...]:
        spec = self.arrays[name]
        return (self.group_rows(spec.group), *spec.row_shape)

    def group_arrays(self, group: str) -> list[str]:
        return sorted(n for n, a in self.arrays.items() if a.group == group)

    def views_list(self) -> list[int]:
        """Every view the cache holds: 0..K-1, then -1 for the eval view."""
        return list(range(self.views)) + ([-1] if self.eval_view else [])

    def units(self, views: list[int] | None = None) -> list[Unit]:
        """The chunks of ``views`` (default: every view the cache holds), in writing order."""
        chosen = self.views_list() if views is None else views
        return [Unit(v, c) for v in chosen for c in range(self.chunks_per_view)]

    def owner(self, unit: Unit, num_processes: int) -> int:
        """The process that writes ``unit``: ``(v·chunks + c) mod P``, the eval view as v = K."""
        v = self.views if unit.view < 0 else unit.view
        return (v * self.chunks_per_view + unit.chunk) % num_processes

    def sample_range(self, unit: Unit) -> tuple[int, int]:
        """The sample indices ``[start, stop)`` of a chunk."""
        start = unit.chunk * self.chunk
        return start, min(start + self.chunk, self.num_samples)

    def row_range(self, unit: Unit) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a chunk in the arrays of its group."""
        start, stop = self.sample_range(unit)
        base = 0 if unit.view < 0 else unit.view * self.num_samples
        return base + start, base + stop

    def differences(self, other: Manifest) -> list[tuple[str, Any, Any]]:
        """(dotted key, value here, value there) for every leaf that differs."""
        return diff_dicts(self.to_dict(), other.to_dict())


def diff_dicts(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves that differ between two JSON-like values, as (dotted key, a, b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append((key, a.get(k, "<absent>"), b.get(k, "<absent>")))
            else:
                out.extend(diff_dicts(a[k], b[k], key))
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix or "<root>", a, b)]


# -- arrays ---------------------------------------------------------------------------------------
def create_arrays(cache_dir: Path, manifest: Manifest) -> None:
    """Preallocate every array file at its full size (sparse where the filesystem allows)."""
    for name, spec in manifest.arrays.items():
        arr = np.lib.format.open_memmap(
            cache_dir / spec.file(name), mode="w+", dtype=np.dtype(spec.dtype),
            shape=manifest.array_shape(name),
        )
        arr.flush()
        del arr


def open_arrays(cache_dir: Path, manifest: Manifest, mode: str = "r") -> dict[str, np.memmap]:
    """Memory-map every array of the cache; each must have the manifest's dtype and shape."""
    out: dict[str, np.memmap] = {}
    for name, spec in manifest.arrays.items():
        path = cache_dir / spec.file(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected the cache array {name!r}, found no file")
        try:
            arr = np.lib.format.open_memmap(path, mode=mode)
        except ValueError as err:  # truncated or not a .npy file
            raise ValueError(f"{path}: expected a .npy array, found: {err}") from err
        want = (np.dtype(spec.dtype), manifest.array_shape(name))
        if (arr.dtype, arr.shape) != want:
            raise ValueError(
                f"{path}: expected dtype {want[0]} shape {want[1]} (manifest), found "
                f"{arr.dtype} {arr.shape}"
            )
        out[name] = arr
    return out


def unit_checksums(arrays: dict[str, np.ndarray], manifest: Manifest, unit: Unit) -> dict[str, str]:
    """sha256 of the bytes of ``unit``'s rows in every array of its group."""
    start, stop = manifest.row_range(unit)
    return {
        name: hashlib.sha256(np.ascontiguousarray(arrays[name][start:stop]).data).hexdigest()
        for name in manifest.group_arrays(unit.group)
    }


# -- completion markers ---------------------------------------------------------------------------
def marker_path(cache_dir: Path, unit: Unit) -> Path:
    return cache_dir / DONE_DIR / f"{unit.key}.json"


def write_marker(
    cache_dir: Path, manifest: Manifest, unit: Unit, checksums: dict[str, str],
    bad: list[int], process_index: int,
) -> None:
    """Record ``unit`` as complete (call only after its rows are flushed)."""
    marker = {
        "unit": unit.key,
        "rows": list(manifest.row_range(unit)),
        "samples": list(manifest.sample_range(unit)),
        "sha256": checksums,
        "manifest_id": manifest.id,
        "bad_samples": bad,
        "process_index": process_index,
    }
    atomic_write_text(marker_path(cache_dir, unit), json.dumps(marker, indent=1) + "\n")


def read_marker(
    cache_dir: Path, manifest: Manifest, unit: Unit, manifest_id: str | None = None
) -> dict[str, Any] | None:
    """The marker of ``unit`` if it exists and belongs to this manifest, else None."""
    path = marker_path(cache_dir, unit)
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("manifest_id") != (manifest_id or manifest.id) or marker.get("unit") != unit.key:
        return None
    return marker


def missing_units(cache_dir: Path, manifest: Manifest, units: list[Unit]) -> list[Unit]:
    """The units among ``units`` that have no valid completion marker."""
    done_dir = cache_dir / DONE_DIR
    present = {p.stem for p in done_dir.glob("*.json")} if done_dir.is_dir() else set()
    mid = manifest.id
    return [
        u for u in units if u.key not in present or read_marker(cache_dir, manifest, u, mid) is None
    ]


def describe_units(units: list[Unit], limit: int = 12) -> str:
    """``v0_c3, v1_c0, ... (N more)``: a readable list of chunk keys."""
    keys = [u.key for u in units]
    tail = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + tail


@dataclass
class VerifyReport:
    """What ``verify_cache`` found: chunks without a marker and chunks whose bytes changed."""

    total: int
    missing: list[Unit]
    corrupt: list[tuple[Unit, list[str]]]  # unit and the arrays whose checksum differs

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def summary(self) -> str:
        counts = f"{len(self.missing)} incomplete, {len(self.corrupt)} corrupt"
        lines = [f"{self.total} chunks: {counts}"]
        if self.missing:
            lines.append(f"incomplete (no completion marker): {describe_units(self.missing)}")
        for unit, names in self.corrupt:
            lines.append(f"corrupt: {unit.key}: checksum mismatch in {', '.join(names)}")
        return "\n".join(lines)


def verify_cache(cache_dir: str | os.PathLike[str]) -> VerifyReport:
    """Check that every chunk has a marker and that every array's bytes match its checksum."""
    root = Path(cache_dir)
    manifest = Manifest.load(root)
    arrays = open_arrays(root, manifest, "r")
    units = manifest.units()
    mid = manifest.id
    missing, corrupt = [], []
    for unit in units:
        marker = read_marker(root, manifest, unit, mid)
        if marker is None:
            missing.append(unit)
            continue
        found = unit_checksums(arrays, manifest, unit)
        bad = sorted(n for n in found if marker["sha256"].get(n) != found[n])
        bad += sorted(set(marker["sha256"]) - set(found))
        if bad:
            corrupt.append((unit, bad))
    return VerifyReport(len(units), missing, corrupt)


# -- what a cache is checked against --------------------------------------------------------------
def teacher_identity(arch: str, weights: str | None) -> dict[str, Any]:
    """The teacher a cache was (or would be) made by: arch, weights and the weights' sha256.

    For a checkpoint file the sha256 of its bytes identifies it (its path does not matter). For
    ``torchvision:<ENUM>`` the resolved enum name identifies it, plus the sha256 of the
    downloaded file in ``$TORCH_HOME/hub/checkpoints`` when that file is present.
    """
    from pipeline.models.weights import file_sha256

    if weights is None:
        return {"arch": arch, "weights": None, "sha256": None}
    if not weights.startswith("torchvision:"):
        return {"arch": arch, "weights": weights, "sha256": file_sha256(weights)}
    name, sha = weights, None
    try:
        import torch
        import torchvision

        enum = torchvision.models.get_model_weights(arch.removeprefix("tv_"))
        member = enum[weights.split(":", 1)[1]]
        name = f"torchvision:{member}"
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
        sha = file_sha256(path) if path.is_file() else None
    except (ValueError, KeyError, AttributeError):
        pass  # not a torchvision arch or enum: the weights string alone identifies it
    return {"arch": arch, "weights": name, "sha256": sha}


def teacher_mismatches(cached: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences between two teacher identities that make a cache unusable."""
    out = []
    for key in ("arch", "num_classes", "preact"):
        if key in cached and key in run and cached[key] != run[key]:
            out.append((f"teacher.{key}", cached[key], run[key]))
    c_w, r_w = cached.get("weights"), run.get("weights")
    c_sha, r_sha = cached.get("sha256"), run.get("sha256")
    by_name = any(str(w).startswith("torchvision:") for w in (c_w, r_w)) or not (c_sha and r_sha)
    if by_name and c_w != r_w:
        out.append(("teacher.weights", c_w, r_w))
    elif c_sha and r_sha and c_sha != r_sha:
        out.append(("teacher.sha256 (of the teacher.weights file)", c_sha, r_sha))
    return out
