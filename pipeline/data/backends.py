"""Loader backends behind one config key, ``data.backend``: torchvision | dali | ffcv | nvjpeg.

``build_train_loader`` and ``build_eval_loader`` (exported by ``pipeline.data``) pick the backend
the data spec names; the trainer, the methods and the teacher cache never know which one ran.
Every backend:

- takes its batches from the same pure order functions (``loader.train_order`` or the order
  ``data.sampler`` asks for, ``loader.eval_order``), so a process covers the same samples in the
  same batches whatever the backend, resumes at ``start_step`` the same way, and evaluation
  pads with index -1 the same way;
- asks the augmentation plan for each (index, view)'s crop and flip, so an image matches the
  teacher-cache row of its key;
- yields ``pipeline.types.Batch``; unreadable samples are dropped from training batches and
  turned into padding in evaluation batches, counted by ``loader.bad_samples()`` and added to
  ``index.bad``.

The geometry helpers describe one sample's transform as numbers both accelerated backends
consume: take ``region`` (x, y, w, h) of the decoded image, resize it to ``resized`` (w, h),
cut the ``size``×``size`` window at ``window`` (x, y) of the result (zeros outside it), flip.
These are the operations of ``transforms.apply_crop`` / ``EvalTransform`` in that order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import loader as tv
from pipeline.data.index import BadSample, DatasetIndex
from pipeline.data.plan import AugPlan, Crop, view_for_epoch
from pipeline.data.transforms import EvalTransform

BACKENDS = ("torchvision", "dali", "ffcv", "nvjpeg")
INSTALL = {
    "dali": "pip install -e .[dali]  (the wheel nvidia-dali-cuda130==2.4.0; see "
    "requirements-extras.txt)",
    "ffcv": "apt-get install libturbojpeg0-dev libopencv-dev pkg-config (tools/apt-packages.sh), "
    "then pip install -e .[ffcv]  (ffcv==1.0.2 with numba and opencv-python; see "
    "requirements-extras.txt)",
}


class BackendUnavailable(ImportError):
    """The loader backend a config asks for is not installed; the message says what to install."""


def missing_backend(name: str, err: BaseException) -> BackendUnavailable:
    """The error for ``data.backend: name`` when importing its library failed with ``err``."""
    return BackendUnavailable(
        f"data.backend: {name!r} needs its optional extra, which failed to import "
        f"({type(err).__name__}: {err}); install it with: {INSTALL[name]}"
    )


class Geometry(NamedTuple):
    """One sample's transform: region of the decoded image → resize → window → flip."""

    x: int
    y: int
    w: int
    h: int
    resized_w: int
    resized_h: int
    window_x: int
    window_y: int
    flip: bool


def train_geometry(crop: Crop, plan: AugPlan, width: int, height: int) -> Geometry:
    """The geometry of ``crop`` (from ``plan.draw``) on a ``width``×``height`` image.

    ``pad_crop``: the whole image, not resized, windowed at the box shifted by the padding
    (zeros where the window leaves the image: the padding). ``rrc`` and ``none``: the box,
    resized to ``size``×``size``.
    """
    if plan.kind == "pad_crop":
        return Geometry(
            0, 0, width, height, width, height,
            crop.left - plan.padding, crop.top - plan.padding, crop.flip,
        )
    return Geometry(
        crop.left, crop.top, crop.width, crop.height, plan.size, plan.size, 0, 0, crop.flip
    )


def eval_geometry(tf: EvalTransform, width: int, height: int) -> Geometry:
    """The geometry of ``tf`` on a ``width``×``height`` image (``transforms.EvalTransform``).

    ``resize == 0``: the whole image resized to ``size``×``size``. Otherwise the shorter side
    resized to ``resize`` (the longer one truncated, as ``resize_shorter``), then the centre
    window with ``center_crop``'s rounding (Python's round, half to even).
    """
    if tf.resize == 0:
        return Geometry(0, 0, width, height, tf.size, tf.size, 0, 0, False)
    if width <= height:
        rw, rh = tf.resize, int(tf.resize * height / width)
    else:
        rw, rh = int(tf.resize * width / height), tf.resize
    left = -((tf.size - rw) // 2) if tf.size > rw else int(round((rw - tf.size) / 2.0))
    top = -((tf.size - rh) // 2) if tf.size > rh else int(round((rh - tf.size) / 2.0))
    return Geometry(0, 0, width, height, rw, rh, left, top, False)


class PlannedLoader(tv.OrderedBatches):
    """What the accelerated backends share besides ``OrderedBatches``: the data spec, the plan
    (None: the eval transform), the output size and the decoding threads (``data.workers``,
    at least 1). Unreadable samples are dropped (training) or made padding (evaluation)."""

    backend = ""

    def __init__(
        self,
        index: DatasetIndex,
        spec: DataSpec,
        order: np.ndarray,
        view: int,
        start_step: int,
        train: bool,
        plan: AugPlan | None,
        epoch: int = 0,
    ) -> None:
        super().__init__(index, order, view, start_step, spec.workers, train)
        self.spec = spec
        self.plan = plan
        self.epoch = epoch
        self.eval_tf = EvalTransform.from_spec(spec)
        self.size = plan.size if plan is not None else self.eval_tf.size
        self.threads = max(1, spec.workers)

    def known_bad(self) -> dict[int, BadSample]:
        """Samples already known to be unreadable (by the index or this loader), by index."""
        return {**{b.index: b for b in self.index.bad}, **self._bad}


def _backend(spec: DataSpec) -> str:
    if spec.backend not in BACKENDS:
        raise ConfigError(
            f"data.backend: expected one of {'|'.join(BACKENDS)}, found {spec.backend!r}"
        )
    return spec.backend


def _planned(backend: str) -> type[PlannedLoader]:
    """The loader class of an accelerated backend (imported only when asked for)."""
    if backend == "dali":
        from pipeline.data.dali import DaliLoader

        return DaliLoader
    if backend == "nvjpeg":
        from pipeline.data.nvjpeg import NvjpegLoader

        return NvjpegLoader
    from pipeline.data.ffcv import FfcvLoader

    return FfcvLoader


def build_train_loader(
    index: DatasetIndex,
    spec: DataSpec,
    plan: AugPlan,
    epoch: int,
    seed: int,
    process_index: int,
    num_processes: int,
    start_step: int = 0,
) -> Any:
    """The training batches of ``epoch`` for one process, from the backend ``data.backend``."""
    backend = _backend(spec)
    if backend == "torchvision":
        return tv.build_train_loader(
            index, spec, plan, epoch, seed, process_index, num_processes, start_step
        )
    order = tv.training_order(spec, len(index), seed, epoch, process_index, num_processes)
    view = view_for_epoch(epoch, spec.views)
    return _planned(backend)(index, spec, order, view, start_step, True, plan, epoch)


def build_eval_loader(
    index: DatasetIndex, spec: DataSpec, process_index: int, num_processes: int
) -> Any:
    """Every sample of ``index`` once across processes (padding: index -1), eval transform."""
    backend = _backend(spec)
    if backend == "torchvision":
        return tv.build_eval_loader(index, spec, process_index, num_processes)
    order = tv.eval_order(len(index), spec.eval_batch_size, process_index, num_processes)
    return _planned(backend)(index, spec, order, -1, 0, False, None)
