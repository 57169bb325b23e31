"""Write a teacher cache: run the teacher over every chunk of (sample, view) this process owns.

For training view v the image of sample i is the TRAIN transform drawn from the augmentation plan
for (i, v) — the very image the student sees in every epoch e with ``e mod K = v`` — and for the
eval view it is the deterministic eval transform. Samples are visited in index order, chunk by
chunk, in batches of ``data.eval_batch_size`` that never cross a chunk boundary, so a chunk's
rows do not depend on which process writes it or on what ran before: a resumed or multi-process
pass writes the same bytes as one uninterrupted pass.

The main process creates the directory (preallocated arrays, then the manifest); every process
then writes its own chunks (see ``cache_format``) and marks each one complete after flushing
it. Re-running the same command skips the chunks already marked complete. A directory that
holds a cache of another configuration is refused, not overwritten.

Images that cannot be decoded get rows of zeros and are listed in their chunk's marker
(``bad_samples``); the training loader drops such samples, so those rows are never read.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.data import AugPlan, DatasetIndex, build_train_index
from pipeline.data.device import to_device
from pipeline.data.rotate import rotate_batch
from pipeline.data.transforms import EvalTransform
from pipeline.models.features import StageSelection, resolve_stages
from pipeline.teacher.cache_format import (
    DONE_DIR,
    EVAL_PREFIX,
    MANIFEST,
    ArraySpec,
    Manifest,
    Unit,
    create_arrays,
    missing_units,
    open_arrays,
    teacher_identity,
    unit_checksums,
    write_marker,
)
from pipeline.teacher.cache_loader import iter_unit_batches
from pipeline.teacher.topk import index_dtype, topk_probs
from pipeline.types import TEACHER_FIELDS

FEATS_LIMIT_BYTES = 8 << 30  # stage maps are cached only when all of them fit in this
_FP16_MAX = 65504.0
AfterBatch = Callable[[Unit, int], None]


@dataclass
class WriteReport:
    """What one process did: chunks it owns, skipped (already complete) and wrote; images/s."""

    process_index: int
    num_processes: int
    units_total: int
    units_owned: int
    units_skipped: int
    units_written: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def cache_fields(spec: RunSpec, method_fields: tuple[str, ...]) -> tuple[str, ...]:
    """The fields to cache: ``teacher.cache_fields`` or, when empty, what the method reads."""
    assert spec.teacher is not None
    fields = tuple(spec.teacher.cache_fields) or tuple(method_fields)
    unknown = [f for f in fields if f not in TEACHER_FIELDS]
    if unknown or not fields:
        raise ConfigError(
            f"teacher.cache_fields: expected a non-empty subset of {list(TEACHER_FIELDS)}, "
            f"found {list(fields)}"
        )
    return tuple(f for f in TEACHER_FIELDS if f in fields)  # canonical order


def autocast_for(spec: RunSpec, device: torch.device) -> tuple[Any, str]:
    """The autocast context the teacher runs in (bf16/fp16 on CUDA per train.mixed_precision)."""
    mp = spec.train.mixed_precision
    if device.type == "cuda" and mp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype), mp
    return contextlib.nullcontext(), "fp32"


def cache_stages(
    spec: RunSpec, fields: tuple[str, ...], model: torch.nn.Module, selection: StageSelection
) -> tuple[int, ...]:
    """The stage maps to cache: ``teacher.cache_stages`` or, when empty, the method's selection,
    as indices of the teacher's ``stage_info`` at the training crop size (none without feats)."""
    if "feats" not in fields:
        return ()
    assert spec.teacher is not None
    chosen = tuple(spec.teacher.cache_stages) or tuple(selection)
    if not chosen:
        raise ConfigError(
            "teacher.cache_stages: 'feats' is in teacher.cache_fields but the method reads no "
            "stage maps; name the stages to cache (indices of the teacher's stage maps, 0 = the "
            "stem, -1 = the last) or drop 'feats'")
    num = len(model.stage_info(spec.data.image_size))
    try:
        return resolve_stages(chosen, num, "teacher.cache_stages")
    except ValueError as err:
        raise ConfigError(str(err)) from err


def build_manifest(
    spec: RunSpec, index: DatasetIndex, model: torch.nn.Module, fields: tuple[str, ...],
    preact: bool, num_classes: int, precision: str, stages: tuple[int, ...] = (),
) -> Manifest:
    """The manifest of the cache ``spec`` asks for; array shapes come from one probe forward.
    ``stages`` are the stage maps cached when ``fields`` holds ``feats``."""
    t = spec.teacher
    assert t is not None
    views, eval_view = spec.data.views, t.cache_eval_view
    if views == 0 and not eval_view:
        raise ConfigError(
            "data.views: expected K >= 1 training views to cache (or teacher.cache_eval_view: "
            "true), found 0 (a fresh view every epoch cannot be cached)"
        )
    if t.cache_chunk < 1:
        raise ConfigError(f"teacher.cache_chunk: expected >= 1 rows, found {t.cache_chunk}")
    if not 0 <= t.cache_topk < num_classes:
        raise ConfigError(
            f"teacher.cache_topk: expected 0 (full logits) or 0 < k < {num_classes} classes, "
            f"found {t.cache_topk}"
        )
    plan = AugPlan.from_spec(spec.data, spec.seed)
    eval_tf = EvalTransform.from_spec(spec.data)
    temperature = float(spec.method.get("T", 1.0))
    logits_info: dict[str, Any] | None = None
    if "logits" in fields:
        logits_info = {"mode": "full"}
        if t.cache_topk:
            logits_info = {"mode": "topk", "k": t.cache_topk, "temperature": temperature}
    arrays: dict[str, ArraySpec] = {}
    groups = (["train"] if views else []) + (["eval"] if eval_view else [])
    for group in groups:
        size = plan.size if group == "train" else eval_tf.size
        group_fields = fields if group == "train" else tuple(sorted({*fields, "embedding"}))
        specs = _array_specs(model, group_fields, stages, preact, size, t.cache_topk)
        # rotated copies (SSKD, HSAKD): R rows per (view, sample), in rotation order
        lead = [plan.rotations] if group == "train" and plan.rotations > 1 else []
        for name, (dtype, shape) in specs.items():
            arrays[(EVAL_PREFIX if group == "eval" else "") + name] = ArraySpec(
                group, dtype, lead + shape)
    n = len(index)
    feats_bytes = sum(
        np.prod(a.row_shape) * 2 * (views * n if a.group == "train" else n)
        for name, a in arrays.items() if "feats_" in name
    )
    if feats_bytes > FEATS_LIMIT_BYTES:
        raise ConfigError(
            f"teacher.cache_fields: caching the stage maps {list(stages)} needs "
            f"{feats_bytes / 2**30:.1f} GiB, more than the {FEATS_LIMIT_BYTES / 2**30:.0f} GiB "
            "allowed; cache fewer views or stages (teacher.cache_stages), or run this method "
            "with an online teacher"
        )
    teacher = teacher_identity(t.arch, t.weights)
    teacher.update(num_classes=num_classes, preact=bool(preact and stages),
                   embedding_dim=int(getattr(model, "embedding_dim", 0)))
    return Manifest(
        teacher=teacher,
        dataset={"fingerprint": index.fingerprint, "kind": index.kind, "split": index.split,
                 "num_samples": n},
        plan=plan.to_dict(),
        eval_transform={"size": eval_tf.size, "resize": eval_tf.resize} if eval_view else None,
        normalize={"mean": [float(x) for x in spec.data.mean],
                   "std": [float(x) for x in spec.data.std]},
        views=views,
        eval_view=eval_view,
        chunk=t.cache_chunk,
        fields=list(fields),
        stages=[int(s) for s in stages] if "feats" in fields else [],
        logits=logits_info,
        arrays=arrays,
        precision=precision,
    )


def _array_specs(
    model: torch.nn.Module, fields: tuple[str, ...], stages: tuple[int, ...], preact: bool,
    size: int, topk: int,
) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, row shape) of the arrays of one group, from a probe forward pass."""
    device = next(model.parameters()).device
    wanted = stages if "feats" in fields else ()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size, device=device), feats=wanted or False,
                    preact=preact)
    c = int(out.logits.shape[1])
    specs: dict[str, tuple[str, list[int]]] = {}
    if "logits" in fields and topk:
        specs["logits_topk_p"] = ("float16", [topk])
        specs["logits_topk_i"] = (index_dtype(c).name, [topk])
    elif "logits" in fields:
        specs["logits"] = ("float16", [c])
    if "embedding" in fields:
        specs["embedding"] = ("float16", [int(out.embedding.shape[1])])
    for s, f in (out.feats or {}).items():
        specs[f"feats_{s}"] = ("float16", [int(d) for d in f.shape[1:]])
    return specs


def prepare_cache_dir(cache_dir: Path, manifest: Manifest) -> bool:
    """(Main process.) Create the cache, or check that the one there is this one.

    Returns True when an existing cache is resumed. Raises ConfigError naming every differing
    manifest key when the directory holds a cache of another configuration.
    """
    if (cache_dir / MANIFEST).is_file():
        found = Manifest.load(cache_dir)
        check_same_cache(cache_dir, found, manifest)
        return True
    cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache_dir / DONE_DIR, ignore_errors=True)  # no marker may outlive its arrays
    create_arrays(cache_dir, manifest)
    (cache_dir / DONE_DIR).mkdir()
    manifest.save(cache_dir)  # last: a manifest means the arrays exist at full size
    return False


def check_same_cache(cache_dir: Path, found: Manifest, wanted: Manifest) -> None:
    """ConfigError unless the manifest on disk describes the cache this run would write."""
    # The settings first; the array layout they imply last.
    diffs = sorted(found.differences(wanted), key=lambda d: (d[0].startswith("arrays."), d[0]))
    if diffs:
        shown = "; ".join(f"{k}: cache has {a!r}, this run has {b!r}" for k, a, b in diffs[:6])
        if len(diffs) > 6:
            shown += f"; ... ({len(diffs) - 6} more)"
        raise ConfigError(
            f"teacher.cache_dir: {cache_dir} holds a teacher cache of another configuration "
            f"({shown}); choose another teacher.cache_dir or delete that directory"
        )


def _fp16(t: Tensor) -> np.ndarray:
    return t.detach().float().clamp_(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()


def teacher_rows(
    out: Any, manifest: Manifest, group: str, num_classes: int
) -> dict[str, np.ndarray]:
    """The arrays' rows for one batch of teacher outputs (``ModelOutput``)."""
    prefix = EVAL_PREFIX if group == "eval" else ""
    names = set(manifest.group_arrays(group))
    rows: dict[str, np.ndarray] = {}
    if prefix + "logits" in names:
        rows[prefix + "logits"] = _fp16(out.logits)
    if prefix + "logits_topk_p" in names:
        info = manifest.logits or {}
        p, i = topk_probs(out.logits, int(info["k"]), float(info["temperature"]))
        rows[prefix + "logits_topk_p"] = _fp16(p)
        rows[prefix + "logits_topk_i"] = i.cpu().numpy().astype(index_dtype(num_classes))
    if prefix + "embedding" in names:
        rows[prefix + "embedding"] = _fp16(out.embedding)
    for s, f in (out.feats or {}).items():
        if f"{prefix}feats_{s}" in names:
            rows[f"{prefix}feats_{s}"] = _fp16(f)
    return rows


def load_teacher(spec: RunSpec, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The teacher network with its weights, frozen, in eval mode on ``device``."""
    from pipeline.teacher.online import build_teacher_model

    t = spec.teacher
    if t is None or not t.arch:
        raise ConfigError("teacher.arch: expected a teacher to cache, found none")
    if t.weights is None:
        raise ConfigError(
            "teacher.weights: expected a checkpoint or torchvision:<WEIGHTS> to cache, found null "
            "(a randomly initialised teacher cannot be identified later)"
        )
    model, _ = build_teacher_model(t, num_classes)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def write_cache(
    spec: RunSpec,
    fields: tuple[str, ...],
    *,
    stages: StageSelection = (),
    preact: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] | None = None,
    progress: bool | None = None,
    after_batch: AfterBatch | None = None,
    index: DatasetIndex | None = None,
) -> WriteReport:
    """Write (or finish) the cache ``spec.teacher.cache_dir`` as process ``process_index``.

    ``fields`` are the TeacherOutput fields to cache (``cache_fields``); ``stages`` the method's
    stage selection (``cache_stages`` resolves it, or takes ``teacher.cache_stages``) and
    ``preact`` whether those maps are taken before the activation. ``barrier`` synchronises the
    processes (Accelerate's ``wait_for_everyone``); without it, the main process (index 0)
    must have run first.
    ``progress`` (default ``train.progress``) shows a tqdm bar on process 0.
    ``after_batch(unit, rows_done_in_unit)`` is called after each batch is written (tests use it
    to interrupt a pass).
    """
    t = spec.teacher
    if t is None or not t.cache_dir:
        raise ConfigError("teacher.cache_dir: expected the directory to write the cache to")
    device = torch.device(device)
    cache_dir = Path(t.cache_dir).expanduser().resolve()
    index = index if index is not None else build_train_index(spec.data)
    num_classes = spec.data.num_classes or len(index.classes)
    model = load_teacher(spec, num_classes, device)
    if spec.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    autocast, precision = autocast_for(spec, device)
    chosen = cache_stages(spec, fields, model, stages)
    manifest = build_manifest(spec, index, model, fields, preact, num_classes, precision, chosen)
    if process_index == 0:
        prepare_cache_dir(cache_dir, manifest)
    if barrier is not None:
        barrier()
    if not (cache_dir / MANIFEST).is_file():
        raise RuntimeError(
            f"{cache_dir}: expected the manifest written by process 0, found none (run process 0 "
            "first or pass a barrier)"
        )
    check_same_cache(cache_dir, Manifest.load(cache_dir), manifest)
    arrays = open_arrays(cache_dir, manifest, "r+")
    units = manifest.units()
    owned = [u for u in units if manifest.owner(u, num_processes) == process_index]
    pending = missing_units(cache_dir, manifest, owned)
    total = sum(manifest.sample_range(u)[1] - manifest.sample_range(u)[0] for u in pending)
    show = spec.train.progress if progress is None else progress
    bar = _progress_bar(show and process_index == 0, total, num_processes)
    d = spec.data
    rotations = AugPlan.from_dict(manifest.plan).rotations
    t0, images = time.perf_counter(), 0
    done_rows: dict[Unit, int] = {}
    bad: dict[Unit, list[int]] = {}
    try:
        for unit, offset, raw in iter_unit_batches(spec, index, manifest, pending):
            batch = to_device(raw, device, d.mean, d.std, spec.train.channels_last)
            rotated = rotations if unit.group == "train" else 1
            batch = rotate_batch(batch, rotated)  # the student's step does the same
            with torch.no_grad(), autocast:
                out = model(batch.images, feats=chosen or False, preact=preact)
            rows = teacher_rows(out, manifest, unit.group, num_classes)
            if rotated > 1:  # (n·R, ...) interleaved → (n, R, ...): one row per sample
                rows = {k: v.reshape(len(raw), rotated, *v.shape[1:]) for k, v in rows.items()}
            start = manifest.row_range(unit)[0] + offset
            valid = raw.index.numpy() >= 0
            for name, values in rows.items():
                values[~valid] = 0
                arrays[name][start : start + len(values)] = values
            n = len(raw)
            first = manifest.sample_range(unit)[0] + offset
            bad.setdefault(unit, []).extend(int(first + j) for j in np.flatnonzero(~valid))
            done_rows[unit] = done_rows.get(unit, 0) + n
            images += n
            if bar is not None:
                bar.update(n)
            if after_batch is not None:
                after_batch(unit, done_rows[unit])
            lo, hi = manifest.sample_range(unit)
            if done_rows[unit] == hi - lo:
                _complete(cache_dir, manifest, arrays, unit, bad.pop(unit, []), process_index)
    finally:
        if bar is not None:
            bar.close()
        for arr in arrays.values():
            arr.flush()
    seconds = time.perf_counter() - t0
    if barrier is not None:
        barrier()
    return WriteReport(process_index, num_processes, len(units), len(owned),
                       len(owned) - len(pending), len(pending), images, seconds)


def _complete(
    cache_dir: Path, manifest: Manifest, arrays: dict[str, np.memmap], unit: Unit,
    bad: list[int], process_index: int,
) -> None:
    """Flush a finished unit's arrays, checksum its rows and write its completion marker."""
    for name in manifest.group_arrays(unit.group):
        arrays[name].flush()
    sums = unit_checksums(arrays, manifest, unit)
    write_marker(cache_dir, manifest, unit, sums, bad, process_index)


def _progress_bar(enabled: bool, total: int, num_processes: int) -> Any:
    """A tqdm bar in images (it shows img/s and the ETA), on the main process only."""
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"teacher cache (process 0 of {num_processes})",
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr, smoothing=0.1)
