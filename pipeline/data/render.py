"""A sample's ``backends.Geometry`` rendered with torch operations, on the CPU or a GPU.

The operations are those of ``transforms.apply_crop`` / ``EvalTransform`` on PIL images, in the
same order: take the region (x, y, w, h) of the decoded image, resize it to (resized_w,
resized_h) unless that is its size, cut the size×size window at (window_x, window_y) of the
result (zeros where the window leaves it), flip. The resize follows Pillow's bilinear filter
(antialiased: its support grows with the reduction factor; ``F.interpolate(..., antialias=True)``
implements the same filter) in Pillow's two passes, horizontal then vertical, each rounded to
uint8 as Pillow's 8-bit passes are. What remains different from PIL is arithmetic: Pillow sums
in 22-bit fixed point, torch in floating point (float32 on a GPU), so a value within rounding
distance of a half level may come out one level apart after a pass, two after both: measured on
the CPU, 3 % of the values of 224 px crops of 500×375 photos differ, by at most 2 levels
(``benchmarks/results/nvjpeg_cpu_pixels.json``; ``tests/test_nvjpeg.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.backends import Geometry


def _pass(x: Tensor, height: int, width: int) -> Tensor:
    """One antialiased bilinear pass of float (1, C, h, w) pixels, rounded like Pillow's."""
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0.0, 255.0)


def resize(region: Tensor, width: int, height: int) -> Tensor:
    """uint8 (C, h, w) → uint8 (C, height, width), Pillow's bilinear resize (module docstring)."""
    c, h, w = region.shape
    if (w, h) == (width, height):
        return region
    x = region.unsqueeze(0).float()
    if w != width:
        x = _pass(x, h, width)
    if h != height:
        x = _pass(x, height, width)
    return x.squeeze(0).to(torch.uint8)


def render(image: Tensor, geo: Geometry, size: int, out: Tensor | None = None) -> Tensor:
    """``image`` (uint8 (3, H, W)) through ``geo`` → uint8 (3, size, size), written into
    ``out`` when given (which must hold zeros where the window leaves the resized region)."""
    region = image[:, geo.y : geo.y + geo.h, geo.x : geo.x + geo.w]
    resized = resize(region, geo.resized_w, geo.resized_h)
    if out is None:
        out = torch.zeros(3, size, size, dtype=torch.uint8, device=image.device)
    rh, rw = resized.shape[1:]
    # The window [wx, wx + size) × [wy, wy + size) of the resized region, clipped to it.
    sx0, sy0 = max(geo.window_x, 0), max(geo.window_y, 0)
    sx1, sy1 = min(geo.window_x + size, rw), min(geo.window_y + size, rh)
    if sx1 > sx0 and sy1 > sy0:
        dx, dy = sx0 - geo.window_x, sy0 - geo.window_y
        patch = resized[:, sy0:sy1, sx0:sx1]
        if geo.flip:  # flipping the output = flipping the patch and mirroring where it goes
            patch = patch.flip(-1)
            dx = size - (dx + (sx1 - sx0))
        out[:, dy : dy + (sy1 - sy0), dx : dx + (sx1 - sx0)] = patch
    return out
