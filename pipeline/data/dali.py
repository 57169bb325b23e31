"""The NVIDIA DALI backend (extra ``dali``): decode, crop, resize and flip in DALI's threads.

Decoding runs on the GPU (``mixed``, nvJPEG) when CUDA is present and ``data.dali_device`` is
``auto`` or ``gpu``, and on the CPU (``device_id=None``, libjpeg-turbo) otherwise. Python only
feeds the pipeline: one external source gives, per sample, the encoded file (or the raw HWC
array of an in-memory index) and the numbers of its ``backends.Geometry`` — the crop region,
the resize target, the window and the flip, computed from the augmentation plan
(``AugPlan.draw``) or the eval transform. The graph then replays exactly the torchvision
backend's operations:

- ``rrc`` / ``none`` training: ``decoders.image_slice`` decodes only the crop region (absolute
  INT32 anchor/shape), ``resize`` to size×size (linear, antialiased: PIL's bilinear filter);
- ``pad_crop`` training: decode, ``slice`` the window with ``out_of_bounds_policy="pad"`` (zeros),
  which is padding-then-cropping at the plan's box;
- evaluation: decode, ``resize`` to the shorter-side target, ``slice`` the centre window (pad);
- then ``crop_mirror_normalize``: the plan's flip and the CHW layout; on the GPU it also
  normalises with ``data.mean``/``data.std`` (float32 images), on the CPU it keeps uint8 (4× less
  to copy; ``to_device`` normalises on the device).

Batches follow the torchvision backend's order functions (``backends.order_for_training``,
``loader.eval_order``), so the same process sees the same samples in the same batches, and a
resumed epoch starts at ``start_step``.

Unreadable files never reach the decoder: the feed reads each file and checks it first (empty,
unidentifiable, a JPEG without its end-of-image marker after the scan data, a PNG without IEND).
Files DALI may decode differently from PIL (CMYK or palette images, other formats) are decoded
by PIL in the feed and passed on as lossless PNG. Should DALI still fail on a batch, the samples
in flight are checked with PIL (unreadable ones become bad samples, the others go through PIL),
and the pipeline is rebuilt at that step. Bad samples are dropped from training batches (an
all-bad batch is an empty Batch) and are padding in evaluation batches, as in ``loader.py``.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.backends import (
    Geometry,
    PlannedLoader,
    eval_geometry,
    missing_backend,
    train_geometry,
)
from pipeline.data.index import (
    DECODE_ERRORS,
    BadSample,
    DatasetIndex,
    UnreadableSample,
    decode_error,
)
from pipeline.types import Batch

PREFETCH = 2  # DALI's prefetch queue depth: batches in flight besides the one being read
_MAX_RECOVERIES = 8  # DALI failures tolerated per epoch before giving up
_PASS_MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}


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


def jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG file is incomplete, or None: it needs an end-of-image marker after its scan.

    The marker segments are walked to the first start-of-scan, so an embedded EXIF thumbnail's
    own end marker (inside APP1, before the scan) does not count.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            if data.rfind(b"\xff\xd9", pos + 2 + length) < 0:
                return "image file is truncated (no JPEG end-of-image marker after the scan)"
            return None
        pos += 2 + length
    return "image file is truncated (no JPEG scan data)"


# Per dataset index: sample → (width, height) of files already checked and passed as they are,
# so that later epochs skip the header parse (a third of the feed's time per sample).
_CHECKED: weakref.WeakKeyDictionary[DatasetIndex, dict[int, tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


def read_encoded(
    index: DatasetIndex, i: int, via_pil: bool = False
) -> tuple[np.ndarray, int, int]:
    """The bytes DALI should decode for sample ``i``, and the image's width and height.

    JPEG and PNG files in RGB or grayscale go as they are; anything else (or ``via_pil``) is
    decoded by PIL exactly as the torchvision backend does and re-encoded as a lossless PNG.
    Raises ``UnreadableSample`` for what PIL could not read either.
    """
    path = index.path(i)
    checked = _CHECKED.setdefault(index, {})

    def bad(error: str) -> UnreadableSample:
        return UnreadableSample(BadSample(i, path, error))

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise bad(f"{type(err).__name__}: {err}") from err
    if not data:
        raise bad("empty file")
    if not via_pil and i in checked and len(data) == int(index.file_sizes[i]):
        w, h = checked[i]
        return np.frombuffer(data, dtype=np.uint8), w, h
    if not via_pil:
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (w, h) = img.format, img.mode, img.size
        except DECODE_ERRORS as err:
            raise bad(decode_error(err, path)) from err
        if fmt == "JPEG":
            problem = jpeg_problem(data)
        elif fmt == "PNG":
            problem = None if b"IEND" in data[-16:] else "image file is truncated (no PNG IEND)"
        else:
            problem = None
        if problem is not None:
            raise bad(problem)
        if mode in _PASS_MODES.get(fmt or "", ()):
            checked[i] = (w, h)
            return np.frombuffer(data, dtype=np.uint8), w, h
    img = index.load(i)  # UnreadableSample if PIL cannot decode it
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), img.width, img.height


_DUMMY_PNG: np.ndarray | None = None


def _dummy_encoded() -> np.ndarray:
    """A tiny valid image fed in place of a padding or bad sample (its output is discarded)."""
    global _DUMMY_PNG
    if _DUMMY_PNG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        _DUMMY_PNG = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    return _DUMMY_PNG


class _Feed:
    """The external source: per-sample inputs of every step, and what each output row is.

    ``rows[k]`` holds, for the k-th batch DALI asks for, one (index, label, view) per fed
    sample; index -1 marks a sample whose output is discarded or zeroed (padding, bad).
    """

    def __init__(self, owner: DaliLoader, order: np.ndarray, first: int) -> None:
        self.owner = owner
        self.order = order
        self.first = first
        self.rows: dict[int, list[tuple[int, int, int]]] = {}

    def __call__(self, info: Any) -> tuple[list[np.ndarray], ...]:
        step = self.first + int(info.iteration)
        if step >= len(self.order):
            raise StopIteration
        owner = self.owner
        bad = owner.known_bad()
        cols: dict[str, list[np.ndarray]] = {name: [] for name in owner.columns}
        rows: list[tuple[int, int, int]] = []
        found: list[BadSample] = []
        for i in self.order[step].tolist():
            sample = None
            if i in bad:
                found.append(bad[i])
            elif i >= 0:
                try:
                    sample = owner.sample(i)
                except UnreadableSample as err:
                    found.append(err.bad)
            if sample is None:
                if owner.train:
                    continue
                sample = owner.placeholder()
                i = -1
            data, geo = sample
            label = int(owner.index.labels[i]) if i >= 0 else 0
            rows.append((i, label, owner.view if i >= 0 else -1))
            _append(cols, data, geo)
        if found:
            owner._record(found)
        if not rows:  # every sample of a training batch was unreadable: feed one, discard it
            data, geo = owner.placeholder()
            _append(cols, data, geo)
            rows.append((-2, 0, 0))
        self.rows[int(info.iteration)] = rows
        return tuple(cols.values())


# The external source's outputs: name → (DALI type name, how a sample's value is made).
_COLUMNS: dict[str, tuple[str, Any]] = {
    "data": ("UINT8", None),
    "anchor": ("INT32", lambda g: np.array([g.x, g.y], dtype=np.int32)),
    "shape": ("INT32", lambda g: np.array([g.w, g.h], dtype=np.int32)),
    "resize_x": ("FLOAT", lambda g: np.array(g.resized_w, dtype=np.float32)),
    "resize_y": ("FLOAT", lambda g: np.array(g.resized_h, dtype=np.float32)),
    "window": ("INT32", lambda g: np.array([g.window_x, g.window_y], dtype=np.int32)),
    "flip": ("INT32", lambda g: np.array(int(g.flip), dtype=np.int32)),
}


def _append(cols: dict[str, list[np.ndarray]], data: np.ndarray, g: Geometry) -> None:
    for name, values in cols.items():
        values.append(data if name == "data" else _COLUMNS[name][1](g))


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
        self.columns = ["data", *(["anchor", "shape"] if self.region else []),
                        *(["resize_x", "resize_y"] if self.resize else []),
                        *(["window"] if self.window else []), "flip"]

    # -- per-sample inputs -----------------------------------------------------------------
    def sample(self, i: int) -> tuple[np.ndarray, Geometry]:
        """(encoded bytes or HWC array, geometry) of sample ``i`` in this loader's view."""
        if self.encoded:
            data, w, h = read_encoded(self.index, i, i in self.via_pil)
        else:
            assert self.index.array is not None
            data = self.index.array[i]
            h, w = data.shape[:2]
        if self.plan is None:
            return data, eval_geometry(self.eval_tf, w, h)
        crop = self.plan.draw(i, self.view, w, h)
        return data, train_geometry(crop, self.plan, w, h)

    def placeholder(self) -> tuple[np.ndarray, Geometry]:
        """A sample whose output is thrown away, with a geometry valid for it."""
        s = self.size
        if self.encoded:
            data = _dummy_encoded()
        else:
            assert self.index.array is not None
            data = np.zeros((8, 8, 3), dtype=np.uint8)
        return data, Geometry(0, 0, 8, 8, s, s, 0, 0, False)

    # -- the pipeline ----------------------------------------------------------------------
    def _pipeline(self, order: np.ndarray, first: int) -> tuple[Any, _Feed]:
        fn, types, Pipeline = _dali()
        feed = _Feed(self, order, first)
        gpu = self.device_id is not None
        batch = int(order.shape[1])
        pipe = Pipeline(
            batch_size=batch,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=PREFETCH,
            seed=0,  # no operator draws random numbers: the plan decides everything
        )
        with pipe:
            outs = fn.external_source(
                source=feed,
                num_outputs=len(self.columns),
                batch=True,
                batch_info=True,
                dtype=[getattr(types, _COLUMNS[c][0]) for c in self.columns],
                layout=["HWC" if c == "data" and not self.encoded else "" for c in self.columns],
            )
            col = dict(zip(self.columns, outs, strict=True))
            data, flip = col["data"], col["flip"]
            dec = "mixed" if gpu else "cpu"
            common = {"output_type": types.RGB, "device": dec}
            if self.encoded and self.region:
                images = fn.decoders.image_slice(
                    data, col["anchor"], col["shape"], axis_names="WH", normalized_anchor=False,
                    normalized_shape=False, **_decoder_args(common),
                )
            elif self.encoded:
                images = fn.decoders.image(data, **_decoder_args(common))
            else:
                images = data.gpu() if gpu else data
                if self.region:
                    images = fn.slice(images, start=col["anchor"], shape=col["shape"],
                                      axis_names="WH")
            if self.resize:
                images = fn.resize(images, resize_x=col["resize_x"], resize_y=col["resize_y"],
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            if self.window:
                images = fn.slice(images, start=col["window"], shape=[self.size, self.size],
                                  axis_names="WH", out_of_bounds_policy="pad", fill_values=0)
            if gpu:
                mean = [255.0 * m for m in self.spec.mean]
                std = [255.0 * s for s in self.spec.std]
                out = fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=std,
                                               dtype=types.FLOAT, output_layout="CHW")
            else:
                out = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8,
                                               output_layout="CHW")
            pipe.set_outputs(out)
        pipe.build()
        return pipe, feed

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        step, recoveries = 0, 0
        while step < len(order):
            pipe, feed = self._pipeline(order, step)
            k = 0
            try:
                while step < len(order):
                    try:
                        (out,) = pipe.run()
                    except RuntimeError:
                        recoveries += 1
                        if recoveries > _MAX_RECOVERIES or not self._recover(order, step):
                            raise
                        break
                    batch = self._batch(out, feed.rows.pop(k))
                    k += 1
                    step += 1
                    yield batch
            finally:
                del pipe

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

    def _batch(self, out: Any, rows: list[tuple[int, int, int]]) -> Batch:
        images = _to_torch(out, self.device_id)
        index = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        view = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        if len(rows) == 1 and rows[0][0] == -2:  # the stand-in of an all-bad training batch
            s = self.size
            empty = torch.zeros(0, dtype=torch.int64)
            return Batch(images[:0].reshape(0, 3, s, s), empty, empty.clone(), empty.clone())
        pad = index < 0
        if pad.any():
            images[pad.to(images.device)] = 0
        return Batch(images=images, labels=labels, index=index, view=view)


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
    return torch.from_numpy(np.array(out.as_tensor(), copy=True))
