"""PIL image → uint8 CHW tensor, for training (a planned crop) and for evaluation.

The operations are those of torchvision on PIL images, so results match it pixel for pixel:

- ``pad_crop``: zero padding then crop (``RandomCrop(size, padding)``); PIL's ``Image.crop``
  fills the part of a box outside the image with zeros, which is the same as padding first.
- ``rrc``: crop the box, resize it to ``size``×``size`` with bilinear filtering (PIL's resize
  is antialiased), as ``transforms.functional.resized_crop`` does on PIL images.
- the flip is applied last, as ``RandomHorizontalFlip`` after the crop.
- evaluation, ``imagenet`` augment: resize the shorter side to ``eval_resize`` (0 means
  ``round(image_size·256/224)``), then a centre crop of ``image_size`` (``Resize`` +
  ``CenterCrop``); other augments: the image as it is, resized to ``image_size`` if it differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipeline.config.schema import DataSpec
from pipeline.data.plan import AugPlan, Crop

_BILINEAR = Image.Resampling.BILINEAR


def pil_to_tensor(img: Image.Image) -> Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def apply_crop(img: Image.Image, crop: Crop, plan: AugPlan) -> Tensor:
    """The training image for ``crop`` (drawn from ``plan``): uint8 (3, size, size)."""
    if plan.kind == "pad_crop":
        # Crop coordinates are in the padded image; shift them back into the original one.
        top, left = crop.top - plan.padding, crop.left - plan.padding
        out = img.crop((left, top, left + crop.width, top + crop.height))
    else:
        out = img.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
    if out.size != (plan.size, plan.size):
        out = out.resize((plan.size, plan.size), _BILINEAR)
    if crop.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_tensor(out)


def train_image(img: Image.Image, plan: AugPlan, index: int, view: int) -> Tensor:
    """Draw the crop of (index, view) from ``plan`` and apply it to ``img``."""
    crop = plan.draw(index, view, img.width, img.height)
    return apply_crop(img, crop, plan)


@dataclass(frozen=True)
class EvalTransform:
    """The deterministic evaluation transform: optional shorter-side resize, centre crop."""

    size: int
    resize: int = 0  # shorter side before the centre crop; 0: resize straight to size×size

    @classmethod
    def from_spec(cls, spec: DataSpec) -> EvalTransform:
        if spec.augment == "imagenet":
            resize = spec.eval_resize or int(round(spec.image_size * 256 / 224))
            return cls(size=spec.image_size, resize=resize)
        return cls(size=spec.image_size)

    def __call__(self, img: Image.Image) -> Tensor:
        if self.resize == 0:
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), _BILINEAR)
            return pil_to_tensor(img)
        return pil_to_tensor(center_crop(resize_shorter(img, self.resize), self.size))


def resize_shorter(img: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is ``short`` (the longer side truncated, like torchvision)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """A centred ``size``×``size`` crop; zero-filled where the image is smaller."""
    w, h = img.size
    left = -((size - w) // 2) if size > w else int(round((w - size) / 2.0))
    top = -((size - h) // 2) if size > h else int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
