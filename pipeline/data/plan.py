"""The augmentation plan: crop box and flip of every (sample, view) as a pure function.

Every loader backend asks the plan where to crop, so the image the student sees for
``(index, view)`` is exactly the image a cached teacher saw for the same key (DESIGN.md,
"Augmentation plan"). The randomness comes from a counter-based generator (Philox) whose
128-bit key is ``(seed, index, view)`` itself: no state is carried between draws, so a draw is
the same in any process, worker, restart or backend, and in any order.

Kinds:

- ``pad_crop`` (CIFAR, Tiny-ImageNet): zero-pad ``padding`` pixels on every side, take a
  ``size``×``size`` crop at a uniform offset in ``0..2·padding`` (for a ``size`` image), flip
  with probability 0.5 — torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``.
- ``rrc`` (ImageNet): the rule of torchvision's ``RandomResizedCrop.get_params`` — up to 10
  attempts with area fraction ~ U(scale) and log-uniform aspect ratio in ``ratio``; the first box
  that fits is placed uniformly; otherwise a centre crop clamped to the ratio range — then the box
  is resized to ``size``×``size``; flip with probability 0.5.
- ``none``: the whole image, no flip.

``rotations`` (1 or 4): how many rotated copies of each cropped image a training batch holds
(``pipeline.data.rotate``: 0°, 90°, 180°, 270°, applied on the device after crop and flip; not
random, so not part of a draw). It is part of the plan because a teacher cache must replay them;
``to_dict`` leaves it out when it is 1, so the manifests of caches written before it existed
still match.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec

PlanKind = Literal["rrc", "pad_crop", "none"]
_U32 = 1 << 32
_RRC_ATTEMPTS = 10


class Crop(NamedTuple):
    """A crop box in pixels of the (padded, for ``pad_crop``) image, and whether to flip it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def view_for_epoch(epoch: int, views: int) -> int:
    """The augmentation view used in ``epoch``: ``epoch mod views``, or ``epoch`` if views is 0."""
    if epoch < 0 or views < 0:
        raise ValueError(f"expected epoch >= 0 and views >= 0, found epoch={epoch} views={views}")
    return epoch if views == 0 else epoch % views


def _generator(seed: int, index: int, view: int) -> np.random.Generator:
    """A Philox stream keyed by (seed, index, view): distinct keys give independent streams."""
    if not (0 <= index < _U32 and 0 <= view < _U32):
        raise ValueError(
            f"expected 0 <= index, view < 2**32 for a plan draw, found index={index} view={view}"
        )
    key = np.array([seed % (1 << 64), index | (view << 32)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


@dataclass(frozen=True)
class AugPlan:
    """Where to crop and whether to flip, for every (sample index, view), given one seed."""

    kind: PlanKind
    size: int
    padding: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    seed: int = 0
    rotations: int = 1

    def __post_init__(self) -> None:
        if self.rotations not in (1, 4):
            raise ValueError(f"expected rotations 1 or 4, found {self.rotations}")
        if self.kind not in ("rrc", "pad_crop", "none"):
            raise ValueError(f"expected plan kind rrc|pad_crop|none, found {self.kind!r}")
        if self.size <= 0 or self.padding < 0:
            raise ValueError(
                f"expected size > 0 and padding >= 0, found {self.size}, {self.padding}"
            )
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"expected 0 < scale[0] <= scale[1] <= 1, found {self.scale}")
        rlo, rhi = self.ratio
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"expected 0 < ratio[0] <= ratio[1], found {self.ratio}")

    @classmethod
    def from_spec(cls, spec: DataSpec, seed: int) -> AugPlan:
        """The training plan a data spec asks for (``data.augment``, ``data.flip``,
        ``data.rotations``; 0 there, "as the method asks", is resolved when a config loads)."""
        plan = cls._crop_plan(spec, seed)
        rotations = max(int(getattr(spec, "rotations", 1)), 1)
        return plan if rotations == 1 else replace(plan, rotations=rotations)

    @classmethod
    def _crop_plan(cls, spec: DataSpec, seed: int) -> AugPlan:
        flip = bool(spec.flip)
        if spec.augment == "cifar":
            return cls("pad_crop", size=32, padding=4, flip=flip, seed=seed)
        if spec.augment == "tiny_imagenet":
            return cls("pad_crop", size=64, padding=8, flip=flip, seed=seed)
        if spec.augment == "imagenet":
            if len(spec.rrc_scale) != 2 or len(spec.rrc_ratio) != 2:
                raise ConfigError(
                    "data.rrc_scale and data.rrc_ratio: expected two numbers each, found "
                    f"{spec.rrc_scale} and {spec.rrc_ratio}"
                )
            try:
                return cls(
                    "rrc",
                    size=spec.image_size,
                    scale=(float(spec.rrc_scale[0]), float(spec.rrc_scale[1])),
                    ratio=(float(spec.rrc_ratio[0]), float(spec.rrc_ratio[1])),
                    flip=flip,
                    seed=seed,
                )
            except ValueError as err:
                raise ConfigError(f"data (augment: imagenet): {err}") from err
        if spec.augment == "none":
            return cls("none", size=spec.image_size, flip=False, seed=seed)
        raise ConfigError(
            f"data.augment: expected cifar|tiny_imagenet|imagenet|none, found {spec.augment!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (stored in teacher-cache manifests)."""
        out = asdict(self)
        out["scale"], out["ratio"] = list(self.scale), list(self.ratio)
        if self.rotations == 1:
            del out["rotations"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugPlan:
        """The inverse of :meth:`to_dict`."""
        return cls(
            kind=d["kind"],
            size=int(d["size"]),
            padding=int(d["padding"]),
            scale=(float(d["scale"][0]), float(d["scale"][1])),
            ratio=(float(d["ratio"][0]), float(d["ratio"][1])),
            flip=bool(d["flip"]),
            seed=int(d["seed"]),
            rotations=int(d.get("rotations", 1)),
        )

    def draw(self, index: int, view: int, width: int, height: int) -> Crop:
        """The crop and flip of sample ``index`` in ``view`` for a ``width``×``height`` image.

        For ``pad_crop`` the box is in the coordinates of the image padded by ``padding``.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"sample {index}: expected a non-empty image, found {width}x{height}")
        if self.kind == "none":
            return Crop(0, 0, height, width, False)
        rng = _generator(self.seed, index, view)
        if self.kind == "pad_crop":
            top, left, h, w = self._pad_crop_box(rng, index, width, height)
        else:
            top, left, h, w = self._rrc_box(rng, width, height)
        flip = bool(rng.random() < 0.5) if self.flip else False
        return Crop(top, left, h, w, flip)

    def draw_many(self, indices: Any, view: int, sizes: Any) -> np.ndarray:
        """Draws for many samples at once: int64 rows ``(top, left, height, width, flip)``.

        ``indices`` is (N,), ``sizes`` (N, 2) as (width, height) — the same numbers
        :meth:`draw` gives one by one.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if len(idx) != len(wh):
            raise ValueError(
                f"expected one (width, height) per index, found {len(idx)} != {len(wh)}"
            )
        out = np.empty((len(idx), 5), dtype=np.int64)
        for row, (i, (w, h)) in enumerate(zip(idx.tolist(), wh.tolist(), strict=True)):
            out[row] = self.draw(i, view, w, h)
        return out

    def _pad_crop_box(
        self, rng: np.random.Generator, index: int, width: int, height: int
    ) -> tuple[int, int, int, int]:
        padded_w, padded_h = width + 2 * self.padding, height + 2 * self.padding
        if padded_w < self.size or padded_h < self.size:
            raise ValueError(
                f"sample {index}: expected an image of at least {self.size - 2 * self.padding} "
                f"pixels a side for a {self.size} crop with padding {self.padding}, "
                f"found {width}x{height}"
            )
        top = int(rng.integers(0, padded_h - self.size + 1))
        left = int(rng.integers(0, padded_w - self.size + 1))
        return top, left, self.size, self.size

    def _rrc_box(
        self, rng: np.random.Generator, width: int, height: int
    ) -> tuple[int, int, int, int]:
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(_RRC_ATTEMPTS):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        # Fallback: the centre crop, clamped to the ratio range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w
