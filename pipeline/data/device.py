"""Move a batch to the device and normalise its images there (uint8 → float, mean/std).

The mean and std tensors are made once per (device, mean, std) and kept: building them for
every batch from Python lists is a blocking host→device copy that drains the GPU's queue.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.types import Batch

_NORM: dict[tuple[str, tuple[float, ...], tuple[float, ...]], tuple[torch.Tensor, torch.Tensor]]
_NORM = {}


def check_norm(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"expected 3 values each for mean and std, found {list(mean)}, {list(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"expected positive std values, found {list(std)}")


def norm_tensors(
    device: torch.device, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (1, 3, 1, 1) mean and std on ``device``, made on the first call only."""
    key = (str(device), tuple(float(m) for m in mean), tuple(float(s) for s in std))
    found = _NORM.get(key)
    if found is None:
        m = torch.tensor(key[1], dtype=torch.float32).view(1, 3, 1, 1).to(device)
        s = torch.tensor(key[2], dtype=torch.float32).view(1, 3, 1, 1).to(device)
        found = _NORM[key] = (m, s)
    return found


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images → float32 ``(x/255 - mean)/std`` on their own device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 or floating images, found {images.dtype}")
    m, s = norm_tensors(images.device, mean, std)
    return (images.float().div_(255.0) - m).div_(s)


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
    check_norm(mean, std)
    moved = batch.to(device)
    images = moved.images
    if channels_last:  # before the float conversion: a transpose of bytes, not of floats
        images = images.contiguous(memory_format=torch.channels_last)
    if not images.is_floating_point():
        images = normalise(images, mean, std)  # keeps the memory format
    return Batch(images=images, labels=moved.labels, index=moved.index, view=moved.view,
                 rotation=moved.rotation)


def pin_available() -> bool:
    """Whether page-locked host memory can be allocated (CUDA is present)."""
    return torch.cuda.is_available()


def pinned_copy(src: torch.Tensor, pin: bool | None = None) -> torch.Tensor:
    """A copy of CPU tensor ``src`` with the same (dense) strides, in page-locked memory when
    ``pin`` (default: when CUDA is present), so that a ``non_blocking`` copy to the GPU really
    does not block. Loader backends whose library reuses its output buffers copy into this."""
    pin = pin_available() if pin is None else pin
    return torch.empty_like(src, pin_memory=pin).copy_(src)  # empty_like keeps dense strides
