"""The DALI backend's input: a stateless batch callback run in DALI's Python worker processes.

DALI's parallel external source (``parallel=True``) calls ``Feed(batch_info)`` in a pool of
worker processes, several batches ahead of the pipeline, so that reading files, checking them
and drawing each sample's geometry from the plan never run in the training thread. The callback
must produce a batch from ``BatchInfo(iteration, epoch_idx)`` alone, and the pipeline (with its
workers) is built once and reused for every epoch and evaluation pass. What changes between
passes travels through a ``JobBoard``, a folder shared with the workers (in ``/dev/shm`` where
there is one):

- ``job_<e>.npy``: what DALI's pass ``e`` (its ``epoch_idx``) reads — the rows of the batch
  order, the view and the first step (a resumed epoch); written by the loader before the pass;
- ``cancel_<e>``: the consumer stopped pass ``e`` early; later batches end it (StopIteration);
- ``status.npy``: per sample, 1 if known unreadable (skipped), 2 if it goes through PIL (DALI
  failed on it once), written by the loader, read by the workers through a shared memory map.

A batch is three outputs, two of them dense arrays (DALI feeds a dense array at once, but a
list of small per-sample arrays one sample at a time, in the training thread):

- ``data``: per sample, the encoded file (or the HWC array of an in-memory index);
- ``geo``: int32 (N, 12), per sample its ``backends.Geometry`` (x, y, w, h, resized w and h,
  window x and y, flip) and what the row is (index, label, view; index -1 for padding or a
  discarded stand-in, -2 for the stand-in of an all-bad training batch);
- ``bad``: int64 (N, 1 + k): row 0 holds the count and the indices of the samples the workers
  found unreadable (so that the loader reports them), the other rows are padding.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.backends import Geometry, eval_geometry, train_geometry
from pipeline.data.encoded import dummy_encoded, read_encoded
from pipeline.data.index import DatasetIndex, UnreadableSample
from pipeline.data.plan import AugPlan
from pipeline.data.transforms import EvalTransform

STATUS_BAD, STATUS_VIA_PIL = 1, 2

OUTPUTS = ("data", "geo", "bad")
GEO = {"anchor": slice(0, 2), "shape": slice(2, 4), "resize_x": 4, "resize_y": 5,
       "window": slice(6, 8), "flip": 8, "index": 9, "label": 10, "view": 11}
GEO_WIDTH = 12


def _shared_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class JobBoard:
    """The folder through which a loader tells its feed's workers what to produce."""

    def __init__(self, num_samples: int) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="kd-dali-", dir=_shared_dir()))
        self.status = np.lib.format.open_memmap(
            self.path / "status.npy", mode="w+", dtype=np.int8, shape=(max(num_samples, 1),)
        )

    def post(self, epoch_idx: int, order: np.ndarray, view: int, first: int) -> None:
        """The job of DALI pass ``epoch_idx`` (written atomically: workers may poll for it)."""
        head = np.full((1, order.shape[1]), -1, dtype=np.int64)
        head[0, :2] = (view, first)
        tmp = self.path / f".job_{epoch_idx}.npy"
        np.save(tmp, np.concatenate([head, order.astype(np.int64)]))
        os.replace(tmp, self.path / f"job_{epoch_idx}.npy")

    def cancel(self, epoch_idx: int) -> None:
        (self.path / f"cancel_{epoch_idx}").touch()

    def retire(self, epoch_idx: int) -> None:
        for name in (f"job_{epoch_idx}.npy", f"cancel_{epoch_idx}"):
            (self.path / name).unlink(missing_ok=True)

    def mark(self, indices: list[int], value: int) -> None:
        if indices:
            self.status[np.asarray(indices, dtype=np.int64)] = value
            self.status.flush()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Feed:
    """The parallel external source's callback (module docstring). Picklable."""

    def __init__(self, index: DatasetIndex, board: Path, train: bool, plan: AugPlan | None,
                 eval_tf: EvalTransform, size: int) -> None:
        self.index, self.board = index, Path(board)
        self.train, self.plan, self.eval_tf, self.size = train, plan, eval_tf, size
        self.encoded = index.files is not None
        self._job: tuple[int, np.ndarray] | None = None
        self._status: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_job": None, "_status": None}

    def _order(self, epoch_idx: int) -> np.ndarray:
        if self._job is None or self._job[0] != epoch_idx:
            self._job = (epoch_idx, np.load(self.board / f"job_{epoch_idx}.npy"))
        return self._job[1]

    def _state(self) -> np.ndarray:
        if self._status is None:
            self._status = np.load(self.board / "status.npy", mmap_mode="r")
        return self._status

    def __call__(self, info: Any) -> tuple[Any, ...]:
        job = self._order(int(info.epoch_idx))
        view, first = int(job[0, 0]), int(job[0, 1])
        step = first + int(info.iteration)
        if step >= len(job) - 1 or (self.board / f"cancel_{int(info.epoch_idx)}").exists():
            raise StopIteration
        status = self._state()
        data: list[np.ndarray] = []
        rows: list[tuple[int, ...]] = []
        found: list[int] = []
        for i in job[1 + step].tolist():
            sample = None
            if i >= 0 and status[i] != STATUS_BAD:
                try:
                    sample = self.sample(i, view, bool(status[i] == STATUS_VIA_PIL))
                except UnreadableSample:
                    found.append(i)
            elif i >= 0:
                found.append(i)
            if sample is None and self.train:
                continue
            meta = (i, int(self.index.labels[i]), view) if sample is not None else (-1, 0, -1)
            encoded, g = sample or self.placeholder()
            data.append(encoded)
            rows.append((*g[:8], int(g.flip), *meta))
        if not rows:  # every sample of a training batch was unreadable: feed a stand-in
            encoded, g = self.placeholder()
            data.append(encoded)
            rows.append((*g[:8], 0, -2, 0, 0))
        geo = np.asarray(rows, dtype=np.int32)
        bad = np.full((len(rows), 1 + len(found)), -1, dtype=np.int64)
        bad[:, 0] = 0
        bad[0, : 1 + len(found)] = [len(found), *found]
        return data, geo, bad

    def sample(self, i: int, view: int, via_pil: bool = False) -> tuple[np.ndarray, Geometry]:
        """(encoded bytes or HWC array, geometry) of sample ``i`` in ``view``."""
        if self.encoded:
            data, w, h = read_encoded(self.index, i, via_pil)
        else:
            assert self.index.array is not None
            data = self.index.array[i]
            h, w = data.shape[:2]
        if self.plan is None:
            return data, eval_geometry(self.eval_tf, w, h)
        crop = self.plan.draw(i, view, w, h)
        return data, train_geometry(crop, self.plan, w, h)

    def placeholder(self) -> tuple[np.ndarray, Geometry]:
        """A sample whose output is thrown away, with a geometry valid for it."""
        s = self.size
        data = dummy_encoded() if self.encoded else np.zeros((8, 8, 3), dtype=np.uint8)
        return data, Geometry(0, 0, 8, 8, s, s, 0, 0, False)
