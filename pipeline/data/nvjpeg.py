"""The ``nvjpeg`` backend: JPEG bytes read in DataLoader workers, batches decoded on the GPU.

GPU decoding where DALI cannot be installed: torchvision's ``decode_jpeg(device="cuda")``
(nvJPEG) and the plan's crop, resize and flip as torch operations on the GPU
(``pipeline.data.render``). The same code runs on the CPU (``data.nvjpeg_device: cpu``, or
``auto`` without CUDA), where torchvision decodes with libjpeg-turbo, exactly as PIL does.

- Workers (``data.workers``, the torchvision backend's DataLoader in the shared batch order)
  read each file and check it (``pipeline.data.encoded``: empty, truncated, not an image...),
  and draw its geometry from the plan (or the eval transform) with the header's size: a sample
  is (JPEG bytes | PIL's RGB pixels for anything that is not an RGB/grayscale JPEG, geometry).
  Unreadable samples are dropped (training) or made padding (evaluation) in the worker, as in
  ``loader.py``; the batch carries them to the loader's bad-sample report.
- The main process decodes each batch's JPEGs in one ``decode_jpeg`` call on the device (one
  that fails is decoded alone, and through PIL if it fails again), renders every sample into a
  uint8 (N, 3, size, size) batch and yields it on the device (``to_device`` normalises).
  This runs in a thread, ``data.nvjpeg_prefetch`` batches ahead of the consumer, on its own
  CUDA stream: the training thread only waits on an event, not for the host.

Pixels: libjpeg-turbo on the CPU decodes like PIL, bit for bit on our test files, and the
resize is Pillow's filter in floating point (at most 2 levels apart, 3 % of values, on 224 px
crops of photos: ``pipeline.data.render``). nvJPEG's IDCT and chroma upsampling are its own:
``tests/test_gpu.py`` bounds the difference on a GPU. The (sample, view) geometry is the plan's
whatever the pixels, so a teacher cache stays valid.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipeline.data.backends import Geometry, PlannedLoader, eval_geometry, train_geometry
from pipeline.data.encoded import inspect_encoded
from pipeline.data.index import BadSample, UnreadableSample
from pipeline.data.loader import _Batches
from pipeline.data.render import render
from pipeline.data.transforms import pil_to_tensor
from pipeline.types import Batch

JPEG, PIXELS, PAD = 0, 1, 2  # what a sample's payload is
PREFETCH = 2  # batches decoded ahead of the consumer
_JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into PIL's convert("RGB")
_NO_GEOMETRY = Geometry(0, 0, 1, 1, 1, 1, 0, 0, False)


def decode_device(choice: str) -> torch.device:
    """The device batches are decoded on for ``data.nvjpeg_device``."""
    if choice not in ("auto", "gpu", "cpu"):
        raise ValueError(f"data.nvjpeg_device: expected auto|gpu|cpu, found {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("data.nvjpeg_device: gpu asked for, but CUDA is not available")
    return torch.device("cuda", torch.cuda.current_device())


Item = tuple[int, Tensor | None, Geometry, int, int, int, BadSample | None]


class EncodedDataset(Dataset):
    """(sample, view) → (kind, payload, geometry, label, index, view, bad), in a worker."""

    def __init__(self, loader: NvjpegLoader) -> None:
        self.index, self.plan, self.eval_tf = loader.index, loader.plan, loader.eval_tf

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        i, view = key
        if i < 0:
            return PAD, None, _NO_GEOMETRY, 0, -1, -1, None
        label = int(self.index.labels[i])
        try:
            kind, payload, w, h = self._payload(i)
        except UnreadableSample as err:
            return PAD, None, _NO_GEOMETRY, label, i, view, err.bad
        if self.plan is None:
            geo = eval_geometry(self.eval_tf, w, h)
        else:
            geo = train_geometry(self.plan.draw(i, view, w, h), self.plan, w, h)
        return kind, payload, geo, label, i, view, None

    def _payload(self, i: int) -> tuple[int, Tensor, int, int]:
        if self.index.array is not None:
            pixels = torch.from_numpy(np.ascontiguousarray(self.index.array[i]))
            return PIXELS, pixels.permute(2, 0, 1), pixels.shape[1], pixels.shape[0]
        enc = inspect_encoded(self.index, i)
        if enc.format == "JPEG" and enc.mode in _JPEG_MODES:
            return JPEG, torch.from_numpy(enc.data.copy()), enc.width, enc.height
        img = self.index.load(i)  # UnreadableSample if PIL cannot decode it
        return PIXELS, pil_to_tensor(img), img.width, img.height


class Collated:
    """A batch as the workers hand it over: payloads and geometry of the kept samples."""

    def __init__(self, items: Sequence[Item], train: bool) -> None:
        self.bad = [it[6] for it in items if it[6] is not None]
        if train:
            items = [it for it in items if it[6] is None]
        else:  # an unreadable sample becomes padding
            items = [it if it[6] is None else (PAD, None, _NO_GEOMETRY, 0, -1, -1, None)
                     for it in items]
        self.kinds = [it[0] for it in items]
        self.payloads = [it[1] for it in items]
        self.geometry = [it[2] for it in items]
        self.labels = torch.tensor([it[3] for it in items], dtype=torch.int64)
        self.index = torch.tensor([it[4] for it in items], dtype=torch.int64)
        self.view = torch.tensor([it[5] for it in items], dtype=torch.int64)

    def pin_memory(self) -> Collated:  # called by the DataLoader's pinning thread
        self.payloads = [p.pin_memory() if p is not None else None for p in self.payloads]
        self.labels, self.index, self.view = (t.pin_memory() for t in
                                              (self.labels, self.index, self.view))
        return self


class _Collate:
    def __init__(self, train: bool) -> None:
        self.train = train

    def __call__(self, items: Sequence[Item]) -> Collated:
        return Collated(items, self.train)


def decode_batch(c: Collated, device: torch.device, size: int) -> Tensor:
    """The uint8 (N, 3, size, size) images of a collated batch, decoded and rendered on
    ``device`` (padding stays zero)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.zeros(len(c.kinds), 3, size, size, dtype=torch.uint8, device=device)
    jpegs = [k for k, kind in enumerate(c.kinds) if kind == JPEG]
    images: dict[int, Tensor] = {}
    if jpegs:
        data = [c.payloads[k] for k in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad apple: decode them one by one
            decoded = [_decode_one(d, device) for d in data]
        images.update(zip(jpegs, decoded, strict=True))
    for k, kind in enumerate(c.kinds):
        if kind == PIXELS:
            images[k] = c.payloads[k].to(device, non_blocking=True)  # type: ignore[union-attr]
    for k, image in images.items():
        render(image, c.geometry[k], size, out[k])
    return out


def _decode_one(data: Tensor, device: torch.device) -> Tensor:
    """One JPEG on ``device``; PIL's decoding (moved there) if torchvision cannot decode it."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return pil_to_tensor(img.convert("RGB")).to(device)


class NvjpegLoader(PlannedLoader):
    """One epoch of training batches, or the evaluation batches, of one process, decoded on
    the device (module docstring)."""

    backend = "nvjpeg"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = decode_device(getattr(self.spec, "nvjpeg_device", "auto"))

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        views = np.full(len(order), self.view if self.train else -1, dtype=np.int64)
        loader: DataLoader[Any] = DataLoader(
            EncodedDataset(self),
            batch_sampler=_Batches(order, views),
            num_workers=self.workers,
            collate_fn=_Collate(self.train),
            pin_memory=torch.cuda.is_available(),
        )
        stage = _DecodeStage(iter(loader), self.device, self.size)
        try:
            for collated, images in stage:
                if collated.bad:
                    self._record(collated.bad)
                yield Batch(images, collated.labels, collated.index, collated.view)
        finally:
            stage.close()


class _DecodeStage:
    """A thread that decodes collated batches ``PREFETCH`` ahead, on its own CUDA stream."""

    _END = object()

    def __init__(self, batches: Iterator[Collated], device: torch.device, size: int) -> None:
        self.batches, self.device, self.size = batches, device, size
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nvjpeg-decode", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for collated in self.batches:
                if self.stopping.is_set():
                    return
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        images = decode_batch(collated, self.device, self.size)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    images, event = decode_batch(collated, self.device, self.size), None
                if not self._put((collated, images, event)):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer
            self._put(err)

    def __iter__(self) -> Iterator[tuple[Collated, Tensor]]:
        # Batches whose decode may still read their pinned bytes: kept until their event has
        # completed (the JPEG decoder's own copies of them are not tracked by torch's pinned
        # memory cache, which could otherwise hand the memory out again too early).
        in_flight: deque[tuple[Any, Collated]] = deque()
        while True:
            item = self.queue.get()
            if item is self._END:
                for event, _ in in_flight:  # the epoch's end: wait for the last decodes
                    event.synchronize()
                return
            if isinstance(item, BaseException):
                raise RuntimeError(f"nvjpeg backend: decoding failed: {item}") from item
            collated, images, event = item
            if event is not None:  # the consumer's stream waits for the decode, not the host
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                images.record_stream(current)
                in_flight.append((event, collated))
                while in_flight and in_flight[0][0].query():
                    in_flight.popleft()
            yield collated, images

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()
