"""The teacher-cache loader: every sample of a chunk, in order, with its view's transform.

The training loader shuffles, drops the last partial batch and uses one view per epoch; a cache
pass needs the opposite: all N samples of a given view, in index order, no shuffle, no drop, in
batches that never cross a chunk boundary (so a chunk's rows do not depend on what else a
process writes). It reuses the data package's ``IndexDataset`` (the TRAIN transform of
(index, view) drawn from the augmentation plan, or the eval transform for view -1) and its
``Collate`` in evaluation mode (an unreadable image becomes padding, index -1, in place).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.config.schema import RunSpec
from pipeline.data import AugPlan, DatasetIndex
from pipeline.data.loader import Collate, IndexDataset
from pipeline.data.transforms import EvalTransform
from pipeline.teacher.cache_format import Manifest, Unit
from pipeline.types import Batch


def _unit_batches(
    manifest: Manifest, units: list[Unit], batch_size: int
) -> list[tuple[Unit, int, list[tuple[int, int]]]]:
    """(unit, first sample offset in the unit, loader keys) of every batch, in order."""
    out = []
    for unit in units:
        start, stop = manifest.sample_range(unit)
        view = unit.view
        for b in range(start, stop, batch_size):
            keys = [(i, view) for i in range(b, min(b + batch_size, stop))]
            out.append((unit, b - start, keys))
    return out


def iter_unit_batches(
    spec: RunSpec, index: DatasetIndex, manifest: Manifest, units: list[Unit]
) -> Iterator[tuple[Unit, int, Batch]]:
    """Loader over the samples of ``units``, in order, with the transform of each unit's view.

    Training views use the TRAIN transform of (index, view) drawn from the plan; the eval view
    (-1) the deterministic eval transform. Unreadable samples come back as padding (index -1).
    """
    plan = AugPlan.from_dict(manifest.plan)
    eval_tf = EvalTransform.from_spec(spec.data)
    for group in ("train", "eval"):
        chosen = [u for u in units if u.group == group]
        if not chosen:
            continue
        dataset = IndexDataset(index, plan if group == "train" else None, eval_tf)
        batches = _unit_batches(manifest, chosen, spec.data.eval_batch_size)
        loader: DataLoader[Any] = DataLoader(
            dataset,
            batch_sampler=[keys for _, _, keys in batches],
            num_workers=spec.data.workers,
            collate_fn=Collate(dataset.size, train=False),
            pin_memory=torch.cuda.is_available(),
        )
        for (unit, offset, _), (images, labels, idx, view, _bad) in zip(
            batches, loader, strict=True
        ):
            yield unit, offset, Batch(images=images, labels=labels, index=idx, view=view)
