"""Checksums checked on first read: a cached teacher never serves a row of a corrupt chunk.

Each chunk's completion marker holds the sha256 of the chunk's bytes in every array
(``cache_format``). The reader (``cached.CacheReader.rows``) asks :class:`ChunkVerifier` before
it reads rows; the first time a (chunk, array) pair is read by this process, its bytes are
hashed and compared with the marker, and a mismatch raises :class:`CorruptCacheError` with the
commands that list (``--verify``) and rewrite (``--repair``) the bad chunks. Later reads of a
verified pair cost one boolean lookup per row.

Cost: every row a process reads is hashed once per run, i.e. one extra sequential read and one
sha256 of each array the run reads, spread over the first epoch of each view (training batches
are random permutations, so nearly every chunk of a view is met in the first steps of the
epoch that uses it). ``tools/bench_cache_verify.py`` measures it against an epoch of reading
the rows (``benchmarks/results/cache_verify.json``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.teacher.cache_format import EVAL_PREFIX, Manifest, Unit, read_marker

REPAIR_HINT = (
    "list every bad chunk with: python launch/cache_teacher.py --cfg <this run's config, with "
    "the same --set flags> --verify; rewrite them with the same command and --repair instead"
)


class CorruptCacheError(ConfigError):
    """A chunk whose bytes do not match the checksum in its completion marker."""


class ChunkVerifier:
    """Remembers which (array, chunk) pairs this process has verified; verifies the others."""

    def __init__(self, cache_dir: Path, manifest: Manifest, arrays: dict[str, np.ndarray]) -> None:
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.arrays = arrays
        self.id = manifest.id
        self.per_view = manifest.chunks_per_view
        # One row of flags per array: chunks of view v at v·per_view + c; the eval view's at c.
        units = max(manifest.views, 1) * self.per_view
        self.verified = {name: np.zeros(units, dtype=bool) for name in arrays}
        self.bytes_hashed = 0

    def check(self, name: str, index: np.ndarray, view: np.ndarray) -> None:
        """Verify, once, every chunk of array ``name`` (no ``eval_`` prefix) that rows
        (``index``, ``view``) fall in; -1 views are the eval-view array's rows."""
        if index.size == 0:
            return
        chunk = index // self.manifest.chunk
        for is_eval in (False, True):
            sel = (view < 0) if is_eval else (view >= 0)
            if not sel.any():
                continue
            array = EVAL_PREFIX + name if is_eval else name
            flags = self.verified.get(array)
            if flags is None:
                continue  # not an array of this cache: the reader reports that
            ids = chunk[sel] if is_eval else view[sel] * self.per_view + chunk[sel]
            todo = np.unique(ids[~flags[ids]])
            for uid in todo.tolist():
                unit = Unit(-1, uid) if is_eval else Unit(uid // self.per_view, uid % self.per_view)
                self._verify(array, unit)
                flags[uid] = True

    def _verify(self, array: str, unit: Unit) -> None:
        start, stop = self.manifest.row_range(unit)
        marker = read_marker(self.cache_dir, self.manifest, unit, self.id)
        if marker is None:
            raise CorruptCacheError(
                f"teacher.cache_dir: chunk {unit.key} of {self.cache_dir} has lost its completion "
                f"marker while the run reads it; {REPAIR_HINT}")
        rows = np.ascontiguousarray(self.arrays[array][start:stop])
        found = hashlib.sha256(rows.data).hexdigest()
        self.bytes_hashed += rows.nbytes
        want = marker["sha256"].get(array)
        if found != want:
            raise CorruptCacheError(
                f"teacher.cache_dir: chunk {unit.key} (rows {start}..{stop - 1}) of array "
                f"{array!r} in {self.cache_dir} fails its checksum (sha256 {found[:16]}..., its "
                f"completion marker says {str(want)[:16]}...): the cache is corrupt and this run "
                f"will not read it; {REPAIR_HINT}")


CORRUPT_SUFFIX = ".corrupt.json"


def set_aside_corrupt(cache_dir: Path, units: list[Unit]) -> list[Path]:
    """Move the completion markers of ``units`` (found corrupt by ``verify_cache``) to
    ``done/<key>.corrupt.json``: the chunks count as incomplete, so the writer rewrites them on
    its next pass, and a run refuses them until then. Returns the moved markers' new paths."""
    from pipeline.teacher.cache_format import marker_path

    moved = []
    for unit in units:
        path = marker_path(cache_dir, unit)
        if path.exists():
            target = path.with_name(unit.key + CORRUPT_SUFFIX)
            path.replace(target)
            moved.append(target)
    return moved
