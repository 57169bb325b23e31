"""Top-k teacher distributions: what a top-k cache stores and how the full one is rebuilt.

A full fp16 logit row costs ``2·C`` bytes (2 KB per (sample, view) on ImageNet); a top-k row
costs ``k·(2 + 2)`` bytes. What is kept is the distribution the distillation loss actually
uses, at the method's temperature T:

    p = softmax(z / T),  stored: the k largest p_i (fp16) and their class indices.

Rebuild (``rebuild_logits``): the k stored probabilities are put back in place, the mass they
leave, ``r = max(0, 1 − Σ_k p_i)``, is spread uniformly over the other ``C − k`` classes, and the
logits returned are ``z' = T·log p̂``. Because ``Σ_c p̂_c = 1``, ``softmax(z'/T) = p̂``: for the
top-k classes this is exactly the stored probability (up to float32 rounding). Two more facts
make ``z'`` a faithful stand-in for ``z``:

- for two top-k classes, ``z'_i − z'_j = T·(log p_i − log p_j) = z_i − z_j`` (up to the fp16
  rounding of the stored p): softmax at any temperature keeps their ratio;
- ``z'`` is finite everywhere: where ``r`` is 0 (the top-k hold all the mass, or fp16 rounding
  made their sum exceed 1) the other classes get the smallest normal float32 probability, so a
  loss that is not a softmax (an MSE on logits) never meets ``-inf``. When the stored sum
  exceeds 1 by rounding (at most 2⁻¹¹ relative), ``softmax(z'/T)`` renormalises it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer dtype that holds every class index: int16 up to 32767 classes."""
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def topk_probs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The k largest entries of ``softmax(logits / T)`` (float32, descending) and their classes.

    ``logits`` is (B, C) of any float dtype; the softmax is computed in float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (B, C), found {tuple(logits.shape)}")
    c = logits.shape[1]
    if not 0 < k <= c:
        raise ValueError(f"expected 0 < k <= {c} classes for a top-k cache, found k={k}")
    if not temperature > 0:
        raise ValueError(f"expected a temperature > 0, found {temperature}")
    p = torch.softmax(logits.float() / temperature, dim=1)
    return torch.topk(p, k, dim=1, largest=True, sorted=True)


def rebuild_probs(probs: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """The full (B, C) float32 distribution from k stored probabilities (module docstring)."""
    if probs.shape != indices.shape or probs.dim() != 2:
        raise ValueError(
            "expected top-k probabilities and indices of the same shape (B, k), found "
            f"{tuple(probs.shape)} and {tuple(indices.shape)}"
        )
    b, k = probs.shape
    if k > num_classes:
        raise ValueError(f"expected k <= {num_classes} classes, found k={k}")
    p = probs.float()
    rest = num_classes - k
    fill = torch.zeros(b, 1, dtype=torch.float32, device=p.device)
    if rest > 0:
        fill = (1.0 - p.sum(dim=1, keepdim=True)).clamp_(min=0.0) / rest
    full = fill.clamp(min=_TINY).expand(b, num_classes).clone()
    return full.scatter_(1, indices.long(), p.clamp(min=_TINY))


def rebuild_logits(probs: Tensor, indices: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Logits ``T·log p̂`` whose softmax at temperature T is the rebuilt distribution p̂."""
    if not temperature > 0:
        raise ValueError(f"expected a temperature > 0, found {temperature}")
    return rebuild_probs(probs, indices, num_classes).log_().mul_(temperature)
