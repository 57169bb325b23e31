"""The NVIDIA DALI backend (extra ``dali``): decode, crop, resize and flip in DALI's threads.

Decoding runs on the GPU (``mixed``, nvJPEG) when CUDA is present and ``data.dali_device`` is
``auto`` or ``gpu``, and on the CPU (``device_id=None``, libjpeg-turbo) otherwise. Python only
feeds the pipeline, from DALI's Python worker processes (a parallel external source,
``pipeline.data.dali_feed``): per sample, the encoded file (or the raw HWC array of an in-memory
index) and the numbers of its ``backends.Geometry`` — the crop region, the resize target, the
window and the flip, computed from the augmentation plan (``AugPlan.draw``) or the eval
transform. The graph then replays exactly the torchvision backend's operations:

- ``rrc`` / ``none`` training: on the CPU ``decoders.image_slice`` decodes only the crop region
  (absolute INT32 anchor/shape); on the GPU the whole image is decoded (``decoders.image``, which
  the hardware JPEG engine serves; a region decode may bypass it) and the region ``slice``d;
  then ``resize`` to size×size (linear, antialiased: PIL's bilinear filter);
- ``pad_crop`` training: decode, ``slice`` the window with ``out_of_bounds_policy="pad"`` (zeros),
  which is padding-then-cropping at the plan's box;
- evaluation: decode, ``resize`` to the shorter-side target, ``slice`` the centre window (pad);
- then ``crop_mirror_normalize``: the plan's flip and the CHW layout; on the GPU it also
  normalises with ``data.mean``/``data.std`` (float32 images), on the CPU it keeps uint8 (4× less
  to copy; ``to_device`` normalises on the device), copied into pinned memory when CUDA is
  present so the copy to the GPU does not block.

The pipeline and its workers are built once per process and loader configuration (index, plan
or eval transform, batch size, threads, device) and reused by every epoch and evaluation pass:
each pass posts its batch order on the feed's job board and runs the pipeline to its end (a
pass stopped early is cancelled and drained). Workers start by fork, or by spawn once CUDA is
initialised in the process (a forked CUDA context is unusable).

Batches follow the torchvision backend's order functions (``loader.training_order``,
``loader.eval_order``), so the same process sees the same samples in the same batches, and a
resumed epoch starts at ``start_step``.

Unreadable files never reach the decoder: the feed reads each file and checks it first
(``pipeline.data.encoded``). Files DALI may decode differently from PIL (CMYK or palette
images, other formats) are decoded by PIL in the feed and passed on as lossless PNG. Should
DALI still fail on a batch, the samples in flight are checked with PIL (unreadable ones become
bad samples, the others go through PIL from then on), and the pipeline is rebuilt at that step.
Bad samples are dropped from training batches (an all-bad batch is an empty Batch) and are
padding in evaluation batches, as in ``loader.py``.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.backends import PlannedLoader, missing_backend
from pipeline.data.dali_feed import GEO, OUTPUTS, STATUS_BAD, STATUS_VIA_PIL, Feed, JobBoard
from pipeline.data.device import pinned_copy
from pipeline.data.encoded import jpeg_problem, read_encoded
from pipeline.data.index import BadSample, DatasetIndex, UnreadableSample
from pipeline.types import Batch

__all__ = ["DaliLoader", "dali_device", "jpeg_problem", "read_encoded"]

PREFETCH = 2  # DALI's prefetch queue depth: batches in flight besides the one being read
FEED_AHEAD = 2  # batches each parallel feed computes ahead
_MAX_RECOVERIES = 8  # DALI failures tolerated per epoch before giving up


def _dali() -> tuple[Any, Any, Any]:
    """(fn, types, Pipeline) of nvidia.dali, or BackendUnavailable saying what to install."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as err:
        raise missing_backend("dali", err) from err
    return fn, types, Pipeline


def dali_device(choice: str) -> int | None:
    """The CUDA device id DALI should decode on, or None for a CPU-only pipeline."""
    if choice not in ("auto", "gpu", "cpu"):
        raise ValueError(f"data.dali_device: expected auto|gpu|cpu, found {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("data.dali_device: gpu asked for, but CUDA is not available")
    return torch.cuda.current_device()


class _Engine:
    """One built pipeline, its feed's workers and job board, reused pass after pass."""

    def __init__(self, loader: DaliLoader, batch: int) -> None:
        self.board = JobBoard(len(loader.index))
        self.epoch_idx = 0
        self.busy = self.broken = False
        self.pipe = _build(loader, self.board, batch)
        self._closer = weakref.finalize(self, JobBoard.close, self.board)

    def passes(self, order: np.ndarray, view: int, first: int) -> Iterator[tuple[Any, ...]]:
        """The pipeline's outputs for steps ``first..`` of ``order``; the pass is cancelled and
        drained when the consumer stops early, so that the next pass starts clean. A failure
        leaves the engine ``broken`` (the loader then builds another)."""
        e = self.epoch_idx
        self.board.post(e, order, view, first)
        self.busy, clean = True, False
        try:
            for k in range(first, len(order)):
                try:
                    outputs = self.pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI pass {e} ended at step {k} of {len(order)}") from None
                yield outputs
            self._drain()
            clean = True
        except GeneratorExit:  # the consumer stopped early
            self.board.cancel(e)
            self._drain()
            clean = True
            raise
        except BaseException:
            self.broken = True
            raise
        finally:
            self.busy = False
            if clean:
                self.pipe.reset()
                self.board.retire(e)
                self.epoch_idx += 1

    def _drain(self) -> None:
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                return

    def close(self) -> None:
        del self.pipe
        self._closer()


# Per dataset index: loader configuration → its engine (closed with the index).
_ENGINES: weakref.WeakKeyDictionary[DatasetIndex, dict[tuple[Any, ...], _Engine]] = (
    weakref.WeakKeyDictionary()
)


class DaliLoader(PlannedLoader):
    """One epoch of training batches, or the evaluation batches, of one process, through DALI."""

    backend = "dali"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _dali()  # fail early, with the install hint, when DALI is missing
        self.device_id = dali_device(getattr(self.spec, "dali_device", "auto"))
        self.encoded = self.index.files is not None
        self.via_pil: set[int] = set()
        kind = self.plan.kind if self.plan is not None else "eval"
        # Which stages the graph needs (see the module docstring).
        self.region = kind in ("rrc", "none")
        self.resize = kind != "pad_crop"
        self.window = kind in ("pad_crop", "eval")

    def feed(self, board: JobBoard) -> Feed:
        # A shallow copy of the index (the arrays are shared): the engine must not hold the
        # index it is cached under, or the cache would keep both alive forever.
        return Feed(copy.copy(self.index), board.path, self.train, self.plan, self.eval_tf,
                    self.size)

    # -- the pipeline ----------------------------------------------------------------------
    def _engine(self, rebuild: bool = False) -> _Engine:
        key = (self.train, self.plan, self.eval_tf, int(self.order.shape[1]), self.threads,
               self.device_id, tuple(self.spec.mean), tuple(self.spec.std))
        engines = _ENGINES.setdefault(self.index, {})
        engine = engines.get(key)
        if engine is not None and (rebuild or engine.busy or engine.broken):
            if not engine.busy:
                engine.close()
            engine = None
        if engine is None:
            engine = engines[key] = _Engine(self, int(self.order.shape[1]))
        return engine

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        step, recoveries, rebuild = 0, 0, False
        while step < len(order):
            engine = self._engine(rebuild)
            self._post_status(engine.board)
            try:
                for images, meta, bad in engine.passes(order, self.view, step):
                    batch = self._batch(images, meta, bad, engine.board)
                    step += 1
                    yield batch
            except RuntimeError:
                recoveries += 1
                if recoveries > _MAX_RECOVERIES or not self._recover(order, step):
                    raise
                rebuild = True

    def _post_status(self, board: JobBoard) -> None:
        """Tell the feed's workers which samples to skip or send through PIL."""
        board.mark(sorted(self.known_bad()), STATUS_BAD)
        board.mark(sorted(self.via_pil), STATUS_VIA_PIL)

    def _recover(self, order: np.ndarray, step: int) -> bool:
        """Re-check the samples in flight at ``step`` with PIL; True if any changed status."""
        if not self.encoded:
            return False
        bad = self.known_bad()
        found: list[BadSample] = []
        changed = False
        for i in np.unique(order[step : step + PREFETCH + 1]).tolist():
            if i < 0 or i in bad or i in self.via_pil:
                continue
            try:
                self.index.load(i)
            except UnreadableSample as e:
                found.append(e.bad)
            else:
                self.via_pil.add(i)
            changed = True
        if found:
            self._record(found)
        return changed

    def _found_bad(self, bad: np.ndarray, board: JobBoard) -> None:
        """Record the samples the workers found unreadable (their reasons found again here)."""
        count = int(bad[0])
        known = self.known_bad()
        found = []
        for i in bad[1 : 1 + count].tolist():
            if i in known:  # skipped by the workers: still reported by this loader
                found.append(known[i])
                continue
            try:
                read_encoded(self.index, i, i in self.via_pil)
                self.index.load(i)
            except UnreadableSample as err:
                found.append(err.bad)
            else:  # unreadable in the worker only (a file that changed?): say so
                found.append(BadSample(i, self.index.path(i), "unreadable in a DALI feed worker"))
        if found:
            self._record(found)
            board.mark([b.index for b in found if b.index not in known], STATUS_BAD)

    def _batch(self, out: Any, geo_out: Any, bad_out: Any, board: JobBoard) -> Batch:
        geo = np.asarray(geo_out.as_tensor())
        self._found_bad(np.asarray(bad_out.as_tensor())[0], board)
        images = _to_torch(out, self.device_id)
        meta = geo[:, [GEO["index"], GEO["label"], GEO["view"]]].astype(np.int64)
        index, labels, view = (pinned_copy(torch.from_numpy(meta[:, c])) for c in range(3))
        if len(meta) == 1 and meta[0, 0] == -2:  # the stand-in of an all-bad training batch
            s = self.size
            empty = torch.zeros(0, dtype=torch.int64)
            return Batch(images[:0].reshape(0, 3, s, s), empty, empty.clone(), empty.clone())
        pad = index < 0
        if pad.any():  # zero the stand-ins without a host sync (boolean indexing would sync)
            keep = (~pad).to(images.dtype).view(-1, 1, 1, 1).to(images.device, non_blocking=True)
            images.mul_(keep)
        return Batch(images=images, labels=labels, index=index, view=view)


def _build(loader: DaliLoader, board: JobBoard, batch: int) -> Any:
    """The DALI pipeline of ``loader``'s configuration, fed from ``board`` (built)."""
    fn, types, Pipeline = _dali()
    gpu = loader.device_id is not None
    workers = max(1, loader.threads)
    pipe = Pipeline(
        batch_size=batch,
        num_threads=loader.threads,
        device_id=loader.device_id,
        prefetch_queue_depth=PREFETCH,
        seed=0,  # no operator draws random numbers: the plan decides everything
        py_num_workers=workers,
        # A forked CUDA context is unusable: spawn once CUDA is initialised here.
        py_start_method="spawn" if torch.cuda.is_initialized() else "fork",
    )
    with pipe:
        data, geo, bad = fn.external_source(
            source=loader.feed(board),
            num_outputs=len(OUTPUTS),
            batch=True,
            batch_info=True,
            parallel=True,
            prefetch_queue_depth=FEED_AHEAD,
            dtype=[types.UINT8, types.INT32, types.INT64],
            layout=["" if loader.encoded else "HWC", "", ""],
        )
        col = {name: geo[where] for name, where in GEO.items()}
        col["data"] = data
        for name in ("resize_x", "resize_y"):
            col[name] = fn.cast(col[name], dtype=types.FLOAT)
        images = _graph(loader, col, fn, types, gpu)
        pipe.set_outputs(images, geo, bad)
    pipe.build()
    return pipe


def _graph(loader: DaliLoader, col: dict[str, Any], fn: Any, types: Any, gpu: bool) -> Any:
    """Decode → region → resize → window → flip (and normalise on the GPU): the output node."""
    data, flip = col["data"], col["flip"]
    common = {"output_type": types.RGB, "device": "mixed" if gpu else "cpu"}
    if loader.encoded and loader.region and not gpu:
        images = fn.decoders.image_slice(
            data, col["anchor"], col["shape"], axis_names="WH", normalized_anchor=False,
            normalized_shape=False, **_decoder_args(common),
        )
    elif loader.encoded:
        images = fn.decoders.image(data, **_decoder_args(common))
        if loader.region:  # GPU: whole-image decode (hardware engine), then the region
            images = fn.slice(images, start=col["anchor"], shape=col["shape"], axis_names="WH")
    else:
        images = data.gpu() if gpu else data
        if loader.region:
            images = fn.slice(images, start=col["anchor"], shape=col["shape"], axis_names="WH")
    if loader.resize:
        images = fn.resize(images, resize_x=col["resize_x"], resize_y=col["resize_y"],
                           interp_type=types.INTERP_LINEAR, antialias=True)
    if loader.window:
        images = fn.slice(images, start=col["window"], shape=[loader.size, loader.size],
                          axis_names="WH", out_of_bounds_policy="pad", fill_values=0)
    if gpu:
        mean = [255.0 * m for m in loader.spec.mean]
        std = [255.0 * s for s in loader.spec.std]
        return fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=std,
                                        dtype=types.FLOAT, output_layout="CHW")
    return fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")


def _decoder_args(common: dict[str, Any]) -> dict[str, Any]:
    """Decoder arguments that make DALI decode like PIL."""
    return {
        **common,
        "jpeg_fancy_upsampling": True,  # libjpeg-turbo's chroma upsampling (PIL's), on GPU too
        "adjust_orientation": False,  # PIL ignores the EXIF orientation too
    }


def _to_torch(out: Any, device_id: int | None) -> torch.Tensor:
    """A DALI TensorList of equal-shape samples as one torch tensor (a copy DALI won't reuse)."""
    if "GPU" in type(out).__name__:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        dst = torch.empty(tensor.shape(), dtype=torch.float32, device=f"cuda:{device_id}")
        feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream())
        return dst
    # A CPU TensorList: copy out of DALI's buffer (reused) into pinned memory when CUDA is here.
    return pinned_copy(torch.from_numpy(np.asarray(out.as_tensor())))
