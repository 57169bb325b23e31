"""The training set a run actually trains on: a stratified fraction, classes dropped or thinned.

Three ``data`` keys select samples of the training split (evaluation splits are never touched):

- ``train_fraction: f`` keeps ``round(f·n_c)`` samples of every class c (half up, at least one
  of a class that has any): the data-limited setting of CID Table 6 (20/40/60 % of CIFAR-100).
- ``drop_classes: [c, ...]`` removes those classes from training (the class list, and so the
  network's output size, stays the dataset's), and ``drop_classes_keep: k`` keeps ``k`` samples
  of each of them instead of none: the zero- and few-shot transfer sets of the MSE-teacher
  supplement (spec §3.3: Hinton's omitted-class experiment; its code has the flag but not the
  protocol, so "k samples per dropped class, drawn like the fraction" is our reading).
- ``subset_seed`` draws which samples: class c's samples are put in the order of a permutation
  seeded by ``(subset_seed, c)`` alone, and a class keeps the first ``m_c`` of that order. So the
  selection does not depend on the run's seed (every seed of a study trains on the same data),
  a class's choice does not depend on the other classes, and smaller fractions are subsets of
  larger ones (20 % ⊂ 40 % ⊂ 60 % for one seed). A dropped class keeps ``min(k, m_c)``.

The subset is a new ``DatasetIndex`` (samples renumbered 0..n−1 in their original order) whose
``selection`` text goes into its fingerprint, so a teacher cache, FFCV file or neighbour list
written from the full split is refused for the subset and the other way round.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.index import DatasetIndex, build_index


def selection_text(spec: DataSpec) -> str:
    """The selection the spec asks for, as recorded in the fingerprint; "" for the whole split."""
    if spec.train_fraction == 1.0 and not spec.drop_classes:
        return ""
    return (f"train_fraction={spec.train_fraction!r} drop_classes={sorted(spec.drop_classes)} "
            f"drop_classes_keep={spec.drop_classes_keep} subset_seed={spec.subset_seed}")


def kept_per_class(
    counts: np.ndarray, fraction: float, drop: list[int], keep: int
) -> np.ndarray:
    """How many samples of each class stay: round(f·n_c) half up (≥ 1 where n_c > 0), and
    min(keep, that) for the dropped classes."""
    counts = np.asarray(counts, dtype=np.int64)
    kept = np.floor(fraction * counts + 0.5).astype(np.int64)
    kept = np.where(counts > 0, np.clip(kept, 1, counts), 0)
    for c in drop:
        kept[c] = min(keep, kept[c])
    return kept


def select_training_samples(
    labels: np.ndarray, num_classes: int, fraction: float, drop: list[int], keep: int, seed: int
) -> np.ndarray:
    """Sorted positions (into ``labels``) of the samples kept (module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    kept = kept_per_class(np.bincount(labels, minlength=num_classes), fraction, drop, keep)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if kept[c] == 0:
            continue
        order = np.random.default_rng([seed, c]).permutation(len(members))
        chosen.append(members[order[: kept[c]]])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen))


def subset_index(index: DatasetIndex, positions: np.ndarray, selection: str) -> DatasetIndex:
    """The samples of ``index`` at ``positions`` (in that order) as an index of their own."""
    pick = np.asarray(positions, dtype=np.int64)
    return DatasetIndex(
        kind=index.kind,
        root=index.root,
        split=index.split,
        classes=list(index.classes),
        labels=index.labels[pick],
        files=None if index.files is None else index.files[pick],
        file_sizes=None if index.file_sizes is None else index.file_sizes[pick],
        array=None if index.array is None else np.ascontiguousarray(index.array[pick]),
        sizes=None if index.sizes is None else index.sizes[pick],
        selection=selection,
        ram_cache_bytes=index.ram_cache_bytes,
    )


def _check_classes(spec: DataSpec, index: DatasetIndex) -> None:
    bad = [c for c in spec.drop_classes if not 0 <= c < index.num_classes]
    if bad:
        raise ConfigError(
            f"data.drop_classes: expected class ids in 0..{index.num_classes - 1} ({index.where} "
            f"has {index.num_classes} classes), found {bad}"
        )


def build_train_index(spec: DataSpec) -> DatasetIndex:
    """The index of the training split with the selection of ``spec`` applied (module
    docstring); the whole split when nothing is selected."""
    index = build_index(spec, spec.train_split)
    selection = selection_text(spec)
    if not selection:
        return index
    _check_classes(spec, index)
    positions = select_training_samples(index.labels, index.num_classes, spec.train_fraction,
                                        list(spec.drop_classes), spec.drop_classes_keep,
                                        spec.subset_seed)
    if len(positions) == 0:
        raise ConfigError(f"data: the selection {selection} leaves no sample of {index.where}")
    return subset_index(index, positions, selection)


__all__ = [
    "build_train_index",
    "kept_per_class",
    "select_training_samples",
    "selection_text",
    "subset_index",
]
