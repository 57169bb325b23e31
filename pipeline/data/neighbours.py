"""Nearest-neighbour lists of the training set in the teacher's embedding space (CoSS Ω^k).

CoSS (Singh & Wang, ECCV 2024; specs/methods.md §4.3) builds its batches from each anchor's
nearest neighbours among the training images, computed once, offline, with the teacher:

- the teacher embeds every training image under the deterministic eval transform (no
  augmentation; the official ``compute_close_far.py`` uses resize 1.05×224 + centre crop);
- the embeddings are L2-normalised and compared by cosine similarity, ``F @ Fᵀ``, in chunks of
  rows (256 in the official code), keeping the top N (384 there) per row, **excluding the row
  itself** [C ``gen_nn_indices``]; the lists are never recomputed during training.

Here the embeddings are the eval-view rows of a teacher cache (``eval_embedding.npy``, written by
``launch/cache_teacher.py`` with ``teacher.cache_eval_view: true``), and the lists are stored
next to it::

    <cache_dir>/neighbours_top<N>.npy    int32 (num_samples, N), row i = sample i's neighbours,
                                         most similar first
    <cache_dir>/neighbours_top<N>.json   {"num_samples", "top_n", "manifest_id", ...}

Differences from the official code, all deliberate:

- self is excluded by masking the diagonal, not by dropping the first column: with duplicate
  images the first column need not be the row itself (the official code asserts it is);
- rows of zeros (images the cache writer could not decode) are never anyone's neighbour;
- ties are broken by ``torch.topk`` (implementation-defined order among equal similarities).

The ``manifest_id`` in the JSON ties the lists to the cache they came from:
``pipeline.teacher.neighbours`` computes the lists from a cache and refuses lists whose cache
manifest has changed since (another teacher, dataset or plan); this module only names, reads and
shape-checks the files, so the data stage needs nothing from the teacher stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.errors import ConfigError

EMBEDDING = "embedding"  # the cache field the lists are computed from (its eval-view array)
DEFAULT_TOP_N = 384  # compute_close_far.py: gen_nn_indices(train_features, k=384)


def neighbours_path(cache_dir: str | os.PathLike[str], top_n: int) -> Path:
    """``<cache_dir>/neighbours_top<N>.npy``: where the lists of a cache are stored."""
    return Path(cache_dir) / f"neighbours_top{top_n}.npy"


def info_path(npy: str | os.PathLike[str]) -> Path:
    """The JSON that describes a neighbour file (same name, ``.json``)."""
    return Path(npy).with_suffix(".json")


def read_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON next to a neighbour file, or None when there is none."""
    p = info_path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def load_neighbours(
    path: str | os.PathLike[str], num_samples: int | None = None, min_cols: int = 1
) -> np.ndarray:
    """A neighbour file, memory-mapped (int32 (N, top_n)), after checking it.

    Checks: a 2-D integer array with at least ``min_cols`` columns and ``num_samples`` rows
    (when given). That the cache it came from is unchanged is the teacher stage's check
    (``pipeline.teacher.neighbours.check_neighbours_source``, run when a run is built).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"data.neighbours: expected a neighbour file at {p.resolve()}, found none; compute "
            "it with: python launch/neighbours.py --cfg <config> (from a teacher cache written "
            "with teacher.cache_eval_view: true)"
        )
    arr = np.load(p, mmap_mode="r")
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ConfigError(f"data.neighbours: {p}: expected an integer (N, top_n) array, "
                          f"found {arr.dtype} {arr.shape}")
    if num_samples is not None and arr.shape[0] != num_samples:
        raise ConfigError(
            f"data.neighbours: {p} holds lists for {arr.shape[0]} samples, found a training "
            f"split of {num_samples}: it was computed for another dataset"
        )
    if arr.shape[1] < min_cols:
        raise ConfigError(f"data.neighbours: {p} holds {arr.shape[1]} neighbours per sample, "
                          f"expected at least data.coss_m = {min_cols}")
    return arr
