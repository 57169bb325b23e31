"""CoSS nearest-neighbour lists from a teacher cache's eval-view embeddings (the teacher stage).

The file format, its JSON and what the lists mean are described in ``pipeline.data.neighbours``,
which reads them for the CoSS sampler. Here they are computed (``compute_cache_neighbours``)
and tied to their cache: ``check_neighbours_source`` refuses lists whose cache manifest has
changed since they were computed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.errors import ConfigError
from pipeline.data.neighbours import (
    DEFAULT_TOP_N,
    EMBEDDING,
    info_path,
    neighbours_path,
    read_info,
)
from pipeline.teacher.cache_format import EVAL_PREFIX, MANIFEST, Manifest, atomic_write_text
from pipeline.teacher.cached import CacheReader

DEFAULT_CHUNK = 256  # rows of F per similarity block in the official code


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
    atomic_write_text(info_path(path), json.dumps(info, indent=2) + "\n")
    return path


def check_neighbours_source(path: str | os.PathLike[str]) -> None:
    """Refuse lists whose JSON names a cache manifest that has changed since (ConfigError).

    Lists without a JSON, or whose cache is no longer next to them, are not checked.
    """
    p = Path(path).expanduser()
    info = read_info(p) if p.is_file() else None
    if info is None or not info.get("manifest_id"):
        return
    if (p.parent / MANIFEST).is_file() and Manifest.load(p.parent).id != info["manifest_id"]:
        raise ConfigError(
            f"data.neighbours: {p} was computed from another version of the cache in "
            f"{p.parent} (its manifest changed); recompute it with launch/neighbours.py"
        )
