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

The ``manifest_id`` in the JSON ties the lists to the cache they came from: ``load_neighbours``
refuses lists whose cache manifest has changed since (another teacher, dataset or plan).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.errors import ConfigError

EMBEDDING = "embedding"  # the cache field the lists are computed from (its eval-view array)
DEFAULT_TOP_N = 384  # compute_close_far.py: gen_nn_indices(train_features, k=384)
DEFAULT_CHUNK = 256  # rows of F per similarity block in the official code


def neighbours_path(cache_dir: str | os.PathLike[str], top_n: int) -> Path:
    """``<cache_dir>/neighbours_top<N>.npy``: where the lists of a cache are stored."""
    return Path(cache_dir) / f"neighbours_top{top_n}.npy"


def info_path(npy: str | os.PathLike[str]) -> Path:
    """The JSON that describes a neighbour file (same name, ``.json``)."""
    return Path(npy).with_suffix(".json")


@torch.no_grad()
def topk_neighbours(
    embeddings: Tensor | np.ndarray,
    top_n: int,
    chunk: int = DEFAULT_CHUNK,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """The ``top_n`` most cosine-similar other rows of every row: int32 (N, top_n).

    Rows are L2-normalised (in float32; the full matrix is kept in float16 on a GPU to halve
    its memory, float32 elsewhere), then ``chunk`` rows at a time are compared with all rows by
    one matrix product and ``torch.topk``. The row itself and all-zero rows are masked out.
    Neighbours are sorted by decreasing similarity.
    """
    if not isinstance(embeddings, Tensor):
        embeddings = np.asarray(embeddings)  # a memmap stays a memmap: read slice by slice
    shape = tuple(embeddings.shape)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"neighbours: expected embeddings (N >= 2, D), found {shape}")
    if chunk < 1:
        raise ValueError(f"neighbours: expected chunk >= 1, found {chunk}")
    n = shape[0]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    feats = torch.empty(n, shape[1], dtype=dtype, device=dev)
    zero = torch.empty(n, dtype=torch.bool, device=dev)
    step = 65536  # normalise slice by slice: no full float32 copy of a float16 (memmap) array
    for s in range(0, n, step):
        part = embeddings[s : s + step]
        if not isinstance(part, Tensor):
            part = torch.from_numpy(np.array(part, dtype=np.float32))
        rows = part.to(dev).float()
        zero[s : s + step] = rows.abs().sum(dim=1) == 0
        feats[s : s + step] = F.normalize(rows, dim=1).to(dtype)
    usable = n - 1 - int(zero.sum())
    if not 1 <= top_n <= usable:
        raise ValueError(
            f"neighbours: expected 1 <= top_n <= {usable} (the other non-zero rows of {n}), "
            f"found top_n={top_n}"
        )
    any_zero = bool(zero.any())
    out = np.empty((n, top_n), dtype=np.int32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        sim = (feats[s:e] @ feats.T).float()
        if any_zero:
            sim[:, zero] = -torch.inf
        rows = torch.arange(e - s, device=dev)
        sim[rows, rows + s] = -torch.inf
        out[s:e] = sim.topk(top_n, dim=1, largest=True, sorted=True).indices.cpu().numpy()
    return out


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, array)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compute_cache_neighbours(
    cache_dir: str | os.PathLike[str],
    top_n: int = DEFAULT_TOP_N,
    chunk: int = DEFAULT_CHUNK,
    device: torch.device | str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Compute the lists from a cache's eval-view embeddings and store them (module docstring).

    Refuses a cache whose eval view is absent or incomplete. Returns the ``.npy`` path
    (``out``, default ``neighbours_path(cache_dir, top_n)``); the JSON is written after it.
    """
    from pipeline.teacher.cache_format import EVAL_PREFIX
    from pipeline.teacher.cached import CacheReader

    reader = CacheReader(cache_dir)
    m = reader.manifest
    name = EVAL_PREFIX + EMBEDDING
    if not m.eval_view or name not in reader.arrays:
        raise ConfigError(
            f"teacher.cache_dir: expected eval-view embeddings ({name}.npy) in "
            f"{reader.cache_dir}, found fields {m.fields} and eval_view={m.eval_view}; write the "
            "cache with teacher.cache_eval_view: true and 'embedding' in teacher.cache_fields"
        )
    missing = reader.missing([-1])
    if missing:
        raise ConfigError(
            f"teacher.cache_dir: the eval view of {reader.cache_dir} is incomplete "
            f"({len(missing)} chunk(s) without a completion marker); finish it with "
            "launch/cache_teacher.py"
        )
    lists = topk_neighbours(reader.arrays[name], top_n, chunk, device)
    path = Path(out) if out is not None else neighbours_path(reader.cache_dir, top_n)
    _atomic_save_npy(path, lists)
    info = {
        "num_samples": int(lists.shape[0]),
        "top_n": int(top_n),
        "cache_dir": str(reader.cache_dir),
        "manifest_id": m.id,
        "dataset_fingerprint": m.dataset.get("fingerprint"),
        "teacher": m.teacher,
        "source": f"{name}.npy, cosine similarity, self excluded",
    }
    from pipeline.teacher.cache_format import atomic_write_text

    atomic_write_text(info_path(path), json.dumps(info, indent=2) + "\n")
    return path


def read_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON next to a neighbour file, or None when there is none."""
    p = info_path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def load_neighbours(
    path: str | os.PathLike[str], num_samples: int | None = None, min_cols: int = 1
) -> np.ndarray:
    """A neighbour file, memory-mapped (int32 (N, top_n)), after checking it.

    Checks: a 2-D integer array with at least ``min_cols`` columns and ``num_samples`` rows
    (when given); and, when its JSON names a cache manifest and that cache's
    manifest is still in the same directory, that it has not changed since.
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
    info = read_info(p)
    if info is not None and info.get("manifest_id"):
        from pipeline.teacher.cache_format import MANIFEST, Manifest

        if (p.parent / MANIFEST).is_file() and Manifest.load(p.parent).id != info["manifest_id"]:
            raise ConfigError(
                f"data.neighbours: {p} was computed from another version of the cache in "
                f"{p.parent} (its manifest changed); recompute it with launch/neighbours.py"
            )
    return arr
