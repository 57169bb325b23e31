"""The FFCV backend (extra ``ffcv``): batches decoded from a ``.beton`` by compiled code.

A split is converted once (``tools/write_ffcv.py``, ``write_beton`` below) into
``<data.ffcv_dir or <root>/ffcv>/<split>.beton`` with three fields: ``image``, ``label`` and
``index``. Row i of the file is sample i of the dataset index, always: an unreadable file gets a
1×1 placeholder and label -1, and is listed, with PIL's error, in the ``<split>.beton.json``
sidecar (next to ``<split>.beton.sizes.npy``, the original width and height of every sample).
The sidecar also holds the dataset fingerprint: a loader refuses a file written from other data.

Images are stored as the original JPEG bytes when libjpeg-turbo decodes them exactly as PIL does
(checked for every file while writing), as raw RGB pixels otherwise (CMYK, PNG, grayscale
conversions...), and resized (longer side ``max_resolution``) and re-encoded only if asked.

Loading: ``ffcv_ops.PlanDecoder`` renders each sample's geometry (backends.Geometry: the plan's
crop and flip of (index, view), or the eval transform), which Python writes into a table before
each epoch — for original-resolution files the pixels equal the torchvision backend's. The
batch order is this process's rows of ``loader.training_order`` / ``eval_order``, given to FFCV's
epoch iterator (what ``Loader(indices=..., order=SEQUENTIAL)`` runs), so sharding, resume and
padding are those of the other backends. The compiled FFCV loader is kept across epochs (only
the order and the table change): numba compiles its pipeline (~5 s) once per process and .beton
(train, each eval split), not once per epoch. Images come out uint8 (N, 3, H, W) with FFCV's
channels-last strides, in pinned memory when CUDA is present (``to_device`` normalises on the
device). FFCV's epoch thread drops its
errors (the consumer would wait forever): ours hands them to the consumer.
``data.ffcv_random_crop: true`` swaps the plan for FFCV's own RandomResizedCrop + flip (training
only): no table to fill, but not reproducible, and its batches do not match a teacher cache.

Trap (NOTES-stack.md #1): FFCV's Loader hangs in ``Graph.group_operations`` on a pipeline that
goes jitted → not jitted → jitted. Ours ends with ``ToTensor``/``ToTorchImage`` (not jitted) and
nothing jitted after them; construction also runs under a timeout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.backends import (
    PlannedLoader,
    eval_geometry,
    missing_backend,
    train_geometry,
)
from pipeline.data.device import pinned_copy
from pipeline.data.index import BadSample, DatasetIndex, resolve_root
from pipeline.types import Batch

FORMAT = "kd-pipeline ffcv v1"
CONSTRUCT_TIMEOUT_S = 300.0  # a Loader that takes longer is the trap-1 hang, not slowness
_CACHE_SIZE = 4


def _ffcv() -> Any:
    """The plan operations module (imports ffcv and numba), or BackendUnavailable."""
    try:
        from pipeline.data import ffcv_ops
    except ImportError as err:
        raise missing_backend("ffcv", err) from err
    return ffcv_ops


def beton_path(spec: DataSpec, split: str) -> Path:
    """Where the ``.beton`` of ``split`` lives: ``data.ffcv_dir`` or ``<data.root>/ffcv``."""
    folder = getattr(spec, "ffcv_dir", "") or str(Path(spec.root) / "ffcv")
    return resolve_root(folder) / f"{split}.beton"


def sidecar(path: Path) -> tuple[Path, Path]:
    """The JSON description and the original-sizes array written next to ``path``."""
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".sizes.npy")


class BetonInfo:
    """A ``.beton``'s sidecar, checked against the dataset index it should hold."""

    def __init__(self, path: Path, index: DatasetIndex) -> None:
        meta_path, sizes_path = sidecar(path)
        hint = (f"write it with: python tools/write_ffcv.py --cfg <config> --split {index.split}"
                f" --out {path}")
        if not path.is_file() or not meta_path.is_file() or not sizes_path.is_file():
            raise ConfigError(f"data.backend ffcv: expected {path} and its sidecars "
                              f"({meta_path.name}, {sizes_path.name}), found none; {hint}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{meta_path}: expected format {FORMAT!r}, found "
                              f"{meta.get('format')!r}; {hint}")
        if meta["fingerprint"] != index.fingerprint or meta["num_samples"] != len(index):
            raise ConfigError(
                f"{path}: written from another dataset (fingerprint {meta['fingerprint'][:12]}, "
                f"{meta['num_samples']} samples) than {index.where} (fingerprint "
                f"{index.fingerprint[:12]}, {len(index)} samples); {hint}"
            )
        stat = path.stat()
        if meta.get("beton_bytes") != stat.st_size:
            raise ConfigError(f"{path}: expected {meta.get('beton_bytes')} bytes as its sidecar "
                              f"records, found {stat.st_size} (rewritten or cut?); {hint}")
        self.path = path
        self.meta = meta
        self.sizes = np.load(sizes_path)  # (N, 5): width, height, stored w, h, mode
        self.bad = {int(b["index"]): BadSample(int(b["index"]), b["path"], b["error"])
                    for b in meta["bad"]}
        self.max_resolution = int(meta.get("max_resolution") or 0)


class _Shared:
    """One compiled FFCV Loader and its geometry table, reused by the loaders of a process."""

    def __init__(self, info: BetonInfo, batch_size: int, threads: int, size: int,
                 random_crop: tuple[float, float, float, float] | None) -> None:
        ops = _ffcv()
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        n = int(info.meta["num_samples"])
        self.table = np.zeros((n, ops.GEOMETRY_COLUMNS), dtype=np.int32)
        if random_crop is None:
            first: list[Any] = [ops.PlanDecoder(self.table, size)]
        else:
            lo, hi, rlo, rhi = random_crop
            first = [RandomResizedCropRGBImageDecoder((size, size), (lo, hi), (rlo, rhi)),
                     RandomHorizontalFlip()]
        pipelines = {
            "image": [*first, ToTensor(), ToTorchImage()],
            "label": [IntDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()],
        }
        self.lock = threading.Lock()
        self.active_view: int | None = None
        self.users = 0
        threads_before = torch.get_num_threads()  # FFCV sets torch's thread count
        self.loader = _construct(
            lambda: Loader(str(info.path), batch_size=batch_size, num_workers=threads,
                           order=OrderOption.SEQUENTIAL, indices=np.arange(min(n, batch_size)),
                           pipelines=pipelines, drop_last=False, batches_ahead=2),
            CONSTRUCT_TIMEOUT_S,
        )
        torch.set_num_threads(threads_before)


def _construct(make: Any, timeout: float) -> Any:
    """``make()`` in a thread, or TimeoutError after ``timeout`` s (FFCV's constructor hang)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = make()
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    worker = threading.Thread(target=run, name="ffcv-loader-construct", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(
            f"FFCV Loader construction did not finish in {timeout:.0f} s: the pipeline probably "
            "alternates jitted and non-jitted operations (NOTES-stack.md trap 1)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


_EPOCH: Any = None


def _epoch_class() -> Any:
    """FFCV's EpochIterator, except that an error in its thread reaches the consumer (FFCV's
    own leaves the consumer waiting forever on its queue)."""
    global _EPOCH
    if _EPOCH is None:
        from ffcv.loader.epoch_iterator import EpochIterator

        class Epoch(EpochIterator):
            error: BaseException | None = None

            def run(self) -> None:
                try:
                    super().run()
                except BaseException as err:  # handed to __next__
                    self.error = err
                    self.output_queue.put(None)

            def __next__(self) -> Any:
                try:
                    return super().__next__()
                except StopIteration:
                    if self.error is not None:
                        raise RuntimeError(
                            f"FFCV's loader thread failed: {type(self.error).__name__}: "
                            f"{self.error}"
                        ) from self.error
                    raise

        _EPOCH = Epoch
    return _EPOCH


_SHARED: dict[tuple[Any, ...], _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _shared_for(info: BetonInfo, key: tuple[Any, ...], *args: Any) -> _Shared:
    with _SHARED_LOCK:
        full = (str(info.path), info.meta["beton_bytes"], info.meta["written"], *key)
        shared = _SHARED.get(full)
        if shared is None or shared.users:
            shared = _Shared(info, *args)
            if len(_SHARED) >= _CACHE_SIZE:
                _SHARED.pop(next(iter(_SHARED)))
            _SHARED[full] = shared
        return shared


class FfcvLoader(PlannedLoader):
    """One epoch of training batches, or the evaluation batches, of one process, from FFCV."""

    backend = "ffcv"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _ffcv()
        import numba

        self.threads = min(self.threads, numba.config.NUMBA_NUM_THREADS)  # numba's ceiling
        self.info = BetonInfo(beton_path(self.spec, self.index.split), self.index)
        self.random_crop = bool(getattr(self.spec, "ffcv_random_crop", False)) and self.train

    def _shared(self) -> _Shared:
        rc = None
        if self.random_crop:
            assert self.plan is not None
            rc = (*self.plan.scale, *self.plan.ratio)
        key = (self.order.shape[1], self.threads, self.size, rc,
               None if self.plan is None else self.plan.kind)
        return _shared_for(self.info, key, self.order.shape[1], self.threads, self.size, rc)

    def _fill(self, table: np.ndarray, samples: np.ndarray) -> None:
        """Write the geometry of each of ``samples`` (this loader's view) into ``table``."""
        sizes, bad = self.info.sizes, self.info.bad
        for i in samples.tolist():
            if i in bad:
                table[i] = 0
                continue
            w, h, sw, sh = (int(v) for v in sizes[i, :4])
            if self.plan is None:
                geo = eval_geometry(self.eval_tf, sw, sh)
            else:
                geo = train_geometry(self.plan.draw(i, self.view, w, h), self.plan, w, h)
                if (sw, sh) != (w, h):  # stored downscaled: scale the region, keep the output
                    fx, fy = sw / w, sh / h
                    x, y = int(geo.x * fx), int(geo.y * fy)
                    geo = geo._replace(
                        x=x, y=y, w=max(1, min(sw - x, round(geo.w * fx))),
                        h=max(1, min(sh - y, round(geo.h * fy))),
                        resized_w=geo.resized_w if self.plan.kind != "pad_crop" else sw,
                        resized_h=geo.resized_h if self.plan.kind != "pad_crop" else sh)
            table[i] = (geo.x, geo.y, geo.w, geo.h, geo.resized_w, geo.resized_h,
                        geo.window_x, geo.window_y, int(geo.flip))

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        from ffcv.pipeline.compiler import Compiler

        shared = self._shared()
        real = np.unique(order[order >= 0])
        with shared.lock:
            if shared.users and shared.active_view != self.view:
                raise RuntimeError("an FFCV loader of another view of this .beton is still "
                                   "being iterated; finish it before starting this one")
            shared.users += 1
            shared.active_view = self.view
        try:
            self._fill(shared.table, real)
            flat = np.where(order >= 0, order, 0).reshape(-1).astype(np.int64)
            threads = torch.get_num_threads()
            Compiler.set_num_threads(shared.loader.num_workers)
            if shared.loader.code is None:
                shared.loader.generate_code()
            epoch = _epoch_class()(shared.loader, flat)
            try:
                for k, (images, labels, idx) in enumerate(epoch):
                    if k == 0:  # FFCV's thread set torch's thread count: give it back
                        torch.set_num_threads(threads)
                    yield self._batch(order[k], images, labels, idx)
            finally:
                epoch.close()
        finally:
            with shared.lock:
                shared.users -= 1

    def _batch(self, row: np.ndarray, images: torch.Tensor, labels: torch.Tensor,
               idx: torch.Tensor) -> Batch:
        got = idx.reshape(-1).numpy()
        want = np.where(row >= 0, row, 0)
        if not np.array_equal(got, want):
            raise RuntimeError(f"{self.info.path}: expected samples {want[:8].tolist()}..., "
                               f"found {got[:8].tolist()}... (is the .beton in index order?)")
        found = [self.info.bad[i] for i in row.tolist() if i in self.info.bad]
        if found:
            self._record(found)
        keep = (row >= 0) & (labels.reshape(-1).numpy() >= 0)
        index = pinned_copy(torch.from_numpy(row))
        label = pinned_copy(labels.reshape(-1))
        view = pinned_copy(torch.full((len(row),), self.view, dtype=torch.int64))
        if keep.all():
            # FFCV reuses its output buffers a few batches later: copy (into pinned memory when
            # CUDA is present, so the trainer's non-blocking copy to the GPU does not block).
            # The copy keeps FFCV's channels-last strides (a memcpy, not a transpose).
            return Batch(pinned_copy(images), label, index, view)
        if self.train:
            k = torch.from_numpy(keep)
            return Batch(pinned_copy(images[k]), label[k], index[k], view[k])
        images = pinned_copy(images)
        pad = torch.from_numpy(~keep)
        images[pad] = 0
        label[pad], index[pad], view[pad] = 0, -1, -1
        return Batch(images, label, index, view)
