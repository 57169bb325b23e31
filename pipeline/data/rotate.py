"""The rotated copies of a training batch (SSKD, HSAKD): 0°, 90°, 180°, 270° of every image.

A method that reads rotated copies says so in its ``Requirements`` (``rotations=4``); the run's
``data.rotations`` then becomes 4 and the augmentation plan carries it (``AugPlan.rotations``,
part of a teacher cache's manifest). Rotations are applied to the batch on the device, after
the plan's crop and flip and the normalisation, in the step every loader backend shares
(``rotate_batch``), so the rotated pixels of (sample, view) are a pure function of the plan's
draw for (sample, view) whatever backend decoded it.

Layout: interleaved per image, as the reference code (SSKD ``cifar.py``, HSAKD
``train_student_cifar.py``): rows ``[img0·rot0, img0·rot90, img0·rot180, img0·rot270, img1·rot0,
…]``; ``Batch.rotation`` holds k (rotation by k·90°, counter-clockwise: ``torch.rot90(x, k,
dims=(2, 3))``, the same as ``np.rot90`` on an (H, W) image), and ``labels``, ``index`` and
``view`` are repeated for the copies of each image.

Simplification (SSKD): the SSKD reference draws a random crop per rotated copy (one flip shared
by the four); here the four copies share the plan's single crop and flip of (sample, view), as
HSAKD does (it rotates the augmented batch). This keeps one plan draw per (sample, view), which
the teacher cache and every backend replay.
"""

from __future__ import annotations

import torch

from pipeline.types import Batch

ROTATIONS = (1, 4)  # allowed values of data.rotations / Requirements.rotations


def rotate_images(images: torch.Tensor, rotations: int) -> torch.Tensor:
    """(N, C, H, W) → (N·R, C, H, W): each image followed by its rotations by 90°, 180°, 270°
    (counter-clockwise), for R = ``rotations`` = 4; R = 1 returns ``images`` unchanged."""
    if rotations not in ROTATIONS:
        raise ValueError(f"rotations: expected one of {ROTATIONS}, found {rotations}")
    if rotations == 1:
        return images
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"rotations: expected square (N, C, H, H) images to rotate, found "
                         f"{tuple(images.shape)}")
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    copies = [images] + [torch.rot90(images, k, dims=(2, 3)) for k in (1, 2, 3)]
    out = torch.stack(copies, dim=1).reshape(-1, *images.shape[1:])
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def rotate_batch(batch: Batch, rotations: int) -> Batch:
    """``batch`` with R = ``rotations`` interleaved copies of each image (module docstring);
    unchanged for R = 1. Sync-free on a GPU: no host reads, no tensors from Python values."""
    if rotations == 1:
        return batch
    images = rotate_images(batch.images, rotations)
    n = batch.labels.shape[0]

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(n, rotations).reshape(-1)

    rotation = torch.arange(rotations, device=batch.labels.device).repeat(n)
    return Batch(images=images, labels=repeat(batch.labels), index=repeat(batch.index),
                 view=repeat(batch.view), rotation=rotation)


def require_rotations(batch: Batch, method: str) -> None:
    """A method that reads rotated copies refuses a batch without them."""
    if batch.rotation is None:
        raise ValueError(f"method {method}: expected a batch with 4 rotated copies per image "
                         "(data.rotations: 4), found none")
