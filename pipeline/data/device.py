"""Move a batch to the device and normalise its images there (uint8 → float, mean/std)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.types import Batch


def to_device(
    batch: Batch,
    device: torch.device | str,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
) -> Batch:
    """``batch`` on ``device`` with float32 images ``(x/255 - mean)/std``, computed on the device.

    uint8 images travel as uint8 (4× less to copy) and are converted after the copy. Floating
    images are taken as already normalised by their backend and are only moved (and made
    channels-last if asked).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"expected 3 values each for mean and std, found {list(mean)}, {list(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"expected positive std values, found {list(std)}")
    moved = batch.to(device)
    images = moved.images
    if not images.is_floating_point():
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 or floating images, found {images.dtype}")
        m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        images = (images.float().div_(255.0) - m).div_(s)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images=images, labels=moved.labels, index=moved.index, view=moved.view)
