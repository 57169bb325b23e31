"""The cached teacher source: teacher outputs read from a cache written by ``cache_teacher.py``.

``open_cached_teacher(spec, fields, num_classes)`` opens ``teacher.cache_dir`` and refuses, with
a ConfigError naming the differing key and both values, a cache that does not belong to the run:
another teacher (arch, checkpoint sha256 or torchvision weights, class count), another training
set (fingerprint of the train split), another augmentation plan (kind, size, padding, scale,
ratio, flip, seed), other input normalisation, another K (``data.views``), a cache without a
field or stage map the method reads, or a top-k cache made at another temperature than the
method's T. It
then checks that every chunk of every view the run will use (views 0..min(K, epochs)-1) has its
completion marker, and lists the missing chunks if not: it never serves a row that was not
completely written. Checksums are not recomputed at start-up but on first read: each chunk's
bytes are checked against its marker the first time the run reads them, and a corrupt chunk is
refused with the commands that repair it (``cache_verify.py``).

Rows are read by numpy fancy indexing from read-only memory maps, at row ``view·N + index``;
batches whose ``view`` is -1 read the eval-view arrays. A cache of a plan with rotated copies
(``AugPlan.rotations`` R = 4: SSKD, HSAKD) holds R sub-rows per (view, sample), the outputs for
rotation 0..R-1 (key (index, view, rotation)); a lookup of n samples returns n·R rows in the
interleaved layout of the rotated batch (``pipeline.data.rotate``). Logits and embeddings come
back as float32 tensors on the batch's device. For a top-k cache the logits are rebuilt as
described in ``pipeline.teacher.topk``: ``softmax(logits/T)`` equals the stored top-k
probabilities, the rest of the mass spread uniformly over the other classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.data import AugPlan, DatasetIndex, build_train_index
from pipeline.teacher.cache_format import (
    EVAL_PREFIX,
    MANIFEST,
    Manifest,
    describe_units,
    diff_dicts,
    missing_units,
    open_arrays,
    teacher_identity,
    teacher_mismatches,
)
from pipeline.teacher.cache_verify import ChunkVerifier
from pipeline.teacher.topk import rebuild_logits
from pipeline.types import Batch, TeacherOutput


class CacheReader:
    """Read-only rows of a teacher cache (no run checks: see ``open_cached_teacher``)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        if not (self.cache_dir / MANIFEST).is_file():
            raise ConfigError(
                f"teacher.cache_dir: expected a teacher cache ({MANIFEST}) in {self.cache_dir}, "
                "found none; write one with: python launch/cache_teacher.py --cfg <config>"
            )
        try:
            self.manifest = Manifest.load(self.cache_dir)
            self.arrays = open_arrays(self.cache_dir, self.manifest, "r")
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"teacher.cache_dir: {err}") from err
        self.num_samples = self.manifest.num_samples
        self.verifier = ChunkVerifier(self.cache_dir, self.manifest, self.arrays)

    def missing(self, views: list[int]) -> list[Any]:
        """The chunks of ``views`` (-1: the eval view) that are not marked complete."""
        return missing_units(self.cache_dir, self.manifest, self.manifest.units(views))

    def rows(self, name: str, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Rows of array ``name`` (without the ``eval_`` prefix) for samples ``index`` in
        ``view`` (per row; -1 reads the eval-view array ``eval_<name>``)."""
        index = np.asarray(index, dtype=np.int64)
        view = np.asarray(view, dtype=np.int64)
        n, k = self.num_samples, self.manifest.views
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(
                f"{self.cache_dir}: expected sample indices in 0..{n - 1}, found "
                f"{index.min()}..{index.max()}"
            )
        if view.size and view.max() >= k:
            raise IndexError(f"{self.cache_dir}: expected views < K = {k}, found {view.max()}")
        self.verifier.check(name, index, view)  # a chunk's checksum, the first time it is read
        is_eval = view < 0
        if not is_eval.any():
            return self.arrays[name][view * n + index]
        evals = self.arrays.get(EVAL_PREFIX + name)
        if evals is None:
            raise KeyError(
                f"{self.cache_dir}: expected eval-view rows ({EVAL_PREFIX}{name}), found that the "
                "eval view is not cached (teacher.cache_eval_view)"
            )
        if is_eval.all():
            return evals[index]
        out = np.empty((len(index), *evals.shape[1:]), dtype=evals.dtype)
        out[is_eval] = evals[index[is_eval]]
        out[~is_eval] = self.arrays[name][view[~is_eval] * n + index[~is_eval]]
        return out


def _tensor(rows: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.float() if t.is_floating_point() else t.to(device)


class CachedTeacher:
    """A teacher source that answers from the cache: ``teacher(batch, images) -> TeacherOutput``.

    Only ``batch.index`` and ``batch.view`` are read, and ``images`` only for its device. Fields
    come back as float32 tensors on that device. ``views`` are the views the run was checked for:
    a batch of any other view is refused.
    """

    def __init__(self, reader: CacheReader, fields: tuple[str, ...], views: list[int]) -> None:
        self.reader = reader
        self.fields = fields
        self.views = set(views)
        m = reader.manifest
        self.topk = m.logits is not None and m.logits["mode"] == "topk"
        self.temperature = float(m.logits.get("temperature", 1.0)) if m.logits else 1.0
        self.num_classes = int(m.teacher["num_classes"])
        self.device = torch.device("cpu")
        self.stages: tuple[int, ...] = tuple(m.stages)
        self.rotations = AugPlan.from_dict(m.plan).rotations
        self.stage_info: tuple = ()  # the teacher's StageInfo, set by the run's build step
        self.parts = None  # pipeline.teacher.parts.TeacherParts, set by the build step

    @property
    def embedding_dim(self) -> int:
        return int(self.reader.manifest.teacher["embedding_dim"])

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.device = torch.device(device)
        return self

    def lookup(self, index: Tensor | np.ndarray, view: Tensor | np.ndarray,
               device: torch.device | None = None) -> TeacherOutput:
        """The cached outputs of samples ``index`` in views ``view``, on ``device``."""
        idx = index.cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
        vw = view.cpu().numpy() if isinstance(view, Tensor) else np.asarray(view)
        unknown = sorted(set(np.unique(vw).tolist()) - self.views)
        if unknown:
            raise ValueError(
                f"{self.reader.cache_dir}: expected batches of the views checked at start-up "
                f"{sorted(self.views)}, found view(s) {unknown}"
            )
        dev = device or self.device
        if self.rotations > 1 and (vw < 0).any():
            raise ValueError(f"{self.reader.cache_dir}: a cache of {self.rotations} rotated "
                             "copies serves training views only, found eval-view (-1) rows")

        def read(name: str, idx: np.ndarray, vw: np.ndarray) -> np.ndarray:
            rows = self.reader.rows(name, idx, vw)
            if self.rotations > 1:  # (n, R, ...) → (n·R, ...): the batch's interleaved layout
                rows = rows.reshape(-1, *rows.shape[2:])
            return rows

        out = TeacherOutput()
        if "logits" in self.fields:
            if self.topk:
                p = _tensor(read("logits_topk_p", idx, vw), dev)
                i = _tensor(read("logits_topk_i", idx, vw), dev)
                out.logits = rebuild_logits(p, i, self.num_classes, self.temperature)
            else:
                out.logits = _tensor(read("logits", idx, vw), dev)
        if "embedding" in self.fields:
            out.embedding = _tensor(read("embedding", idx, vw), dev)
        if "feats" in self.fields:
            out.feats = {s: _tensor(read(f"feats_{s}", idx, vw), dev) for s in self.stages}
        return out

    def __call__(self, batch: Batch, images: Tensor | None = None) -> TeacherOutput:
        """Outputs for ``batch`` on ``images``' device (else ``batch.index``'s).

        Pass the CPU batch the loader yielded (with ``images`` on the device) to avoid the
        device→host copy of ``batch.index``, which on a GPU waits for all queued work.
        """
        device = images.device if images is not None else batch.index.device
        return self.lookup(batch.index, batch.view, device)


def _mismatch(diffs: list[tuple[str, Any, Any]], cache_dir: Path) -> ConfigError:
    shown = "; ".join(f"{key}: cache has {a!r}, this run has {b!r}" for key, a, b in diffs)
    return ConfigError(
        f"teacher.cache_dir: the cache in {cache_dir} does not match this run: {shown}; rewrite "
        "it with launch/cache_teacher.py or point teacher.cache_dir at a matching cache"
    )


def check_cache(
    manifest: Manifest, spec: RunSpec, fields: tuple[str, ...], num_classes: int,
    index: DatasetIndex, preact: bool | None, cache_dir: Path, stages: tuple[int, ...] = (),
) -> None:
    """ConfigError naming every key in which the cache and the run differ, with both values."""
    t = spec.teacher
    assert t is not None
    run_teacher = teacher_identity(t.arch, t.weights)
    run_teacher["num_classes"] = num_classes
    if preact is not None and "feats" in fields:
        run_teacher["preact"] = bool(preact)
    diffs = teacher_mismatches(manifest.teacher, run_teacher)
    diffs += [("dataset.fingerprint (of the train split)", manifest.dataset["fingerprint"],
               index.fingerprint)]
    diffs += [("data.views (K)", manifest.views, spec.data.views)]
    plan = AugPlan.from_spec(spec.data, spec.seed).to_dict()
    diffs += [(f"plan.{k}", a, b) for k, a, b in diff_dicts(manifest.plan, plan)]
    norm = {"mean": [float(x) for x in spec.data.mean], "std": [float(x) for x in spec.data.std]}
    diffs += [(f"data.{k}", a, b) for k, a, b in diff_dicts(manifest.normalize, norm)]
    if manifest.logits and manifest.logits["mode"] == "topk" and "T" in spec.method:
        temperature = ("method.T (temperature of the top-k cache)",
                       float(manifest.logits["temperature"]), float(spec.method["T"]))
        diffs.append(temperature)
    diffs = [(k, a, b) for k, a, b in diffs if diff_dicts(a, b)]
    if diffs:
        raise _mismatch(diffs, cache_dir)
    lacking = [f for f in fields if f not in manifest.fields]
    if lacking:
        raise ConfigError(
            f"teacher.cache_dir: method {spec.method.get('name')!r} reads teacher field(s) "
            f"{lacking}, found a cache in {cache_dir} holding only {manifest.fields}; rewrite it "
            f"with teacher.cache_fields: {sorted(set(manifest.fields) | set(fields))}"
        )
    lacking_stages = [s for s in stages if s not in manifest.stages]
    if "feats" in fields and lacking_stages:
        raise ConfigError(
            f"teacher.cache_dir: method {spec.method.get('name')!r} reads the teacher's stage "
            f"maps {list(stages)}, found a cache in {cache_dir} holding stages "
            f"{manifest.stages}; rewrite it with launch/cache_teacher.py for this method (or "
            f"teacher.cache_stages: {sorted(set(manifest.stages) | set(stages))})"
        )


def open_cached_teacher(
    spec: RunSpec, fields: tuple[str, ...], num_classes: int, *,
    index: DatasetIndex | None = None, preact: bool | None = None, eval_view: bool = False,
    stages: tuple[int, ...] = (), epochs: int | None = None,
) -> CachedTeacher:
    """The cached teacher for a run, after checking the cache belongs to it (module docstring).

    ``index`` is the run's training index (built from ``spec.data`` when not given); ``preact``
    the method's stage-map flavour and ``stages`` the stage maps it reads, both checked when it
    reads ``feats``; ``epochs`` the run's epochs (default ``optim.epochs``; more when the method
    has initial phases), which fixes the views it reads; ``eval_view`` also serves
    batches of view -1 (the deterministic eval view of training samples, for CoSS-style
    neighbours), which the cache must then hold completely.
    """
    t = spec.teacher
    if t is None or not t.cache_dir:
        raise ConfigError("teacher.cache_dir: required when teacher.source is 'cached'")
    if spec.data.views < 1:
        raise ConfigError(
            "data.views: teacher.source 'cached' needs a fixed number K >= 1 of augmentation "
            "views (epoch e uses view e mod K), found 0 (a fresh view every epoch); set "
            "data.views to the K the cache was written with"
        )
    reader = CacheReader(t.cache_dir)
    index = index if index is not None else build_train_index(spec.data)
    check_cache(reader.manifest, spec, fields, num_classes, index, preact, reader.cache_dir,
                stages)
    views = list(range(min(spec.data.views, epochs or spec.optim.epochs)))
    if eval_view:
        if not reader.manifest.eval_view:
            raise ConfigError(
                f"teacher.cache_eval_view: the run reads the eval view of training samples, found "
                f"a cache in {reader.cache_dir} without it; rewrite it with "
                "teacher.cache_eval_view: true"
            )
        views.append(-1)
    missing = reader.missing(views)
    if missing:
        raise ConfigError(
            f"teacher.cache_dir: the cache in {reader.cache_dir} is incomplete: {len(missing)} "
            f"chunk(s) of views {views} have no completion marker ({describe_units(missing)}); "
            "finish it by re-running launch/cache_teacher.py with the same config"
        )
    teacher = CachedTeacher(reader, tuple(fields), views)
    teacher.stages = tuple(stages) if "feats" in fields else ()
    return teacher
