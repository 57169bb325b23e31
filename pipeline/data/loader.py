"""The torchvision backend: a DataLoader over the dataset index, batched by an order we control.

Training order (``train_order``): a permutation of all N samples drawn from (seed, epoch) — the
same in every process — cut into global batches of ``num_processes·batch_size``; process p takes
the p-th ``batch_size`` slice of each. Every process gets the same number of FULL batches,
``N // (num_processes·batch_size)``, and the last ``N mod (num_processes·batch_size)`` samples of
the permutation are left out of this epoch (drop_last); if N is smaller than one global batch,
the permutation is repeated to fill exactly one step. Every sample in epoch e uses the
augmentation view ``view_for_epoch(e, views)``. ``start_step`` skips batches without loading
them, so a resumed epoch yields exactly the batches it had left. ``data.sampler: coss`` swaps
``train_order`` for the CoSS nearest-neighbour order (``coss_sampler.order_function``, same
signature and role); a backend that batches by its own code should take its order from there too.

Evaluation order (``eval_order``): samples 0..N-1 in order, padded with index -1 to
``steps·num_processes·eval_batch_size``, where steps = ceil(N / (num_processes·eval_batch_size)),
and sliced like training. Padding entries have a zero image, label 0, index -1, view -1.

Unreadable images (PIL fails to open or decode them: truncated, empty, not an image) never stop
an epoch. The Dataset returns them flagged, and the collate function, which runs in the worker:
- in training drops them from the batch (a batch may be smaller than batch_size, or even empty
  if every sample in it is bad: a trainer must still take part in that step's collectives);
- in evaluation turns them into padding (index -1), so batches keep their shape for all_gather
  and the gathered results drop them with the rest of the padding.
Each bad sample travels to the main process with its batch and is listed by
``loader.bad_samples()`` (and added to ``index.bad``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config.schema import DataSpec
from pipeline.data.index import BadSample, DatasetIndex, UnreadableSample
from pipeline.data.plan import AugPlan, view_for_epoch
from pipeline.data.transforms import EvalTransform, train_image
from pipeline.types import Batch

Key = tuple[int, int]  # (sample index, view); index -1 is padding
Item = tuple[Tensor | None, int, int, int, BadSample | None]
Collated = tuple[Tensor, Tensor, Tensor, Tensor, list[BadSample]]
_ORDER_TAG = 0x0DE5  # keeps the order stream apart from any other stream keyed by the seed


def _check_process(process_index: int, num_processes: int, batch_size: int) -> None:
    if num_processes < 1 or not 0 <= process_index < num_processes or batch_size < 1:
        raise ValueError(
            "expected num_processes >= 1, 0 <= process_index < num_processes and batch_size >= 1, "
            f"found process_index={process_index} num_processes={num_processes} "
            f"batch_size={batch_size}"
        )


def train_order(
    n: int, batch_size: int, seed: int, epoch: int, process_index: int, num_processes: int
) -> np.ndarray:
    """The sample indices of every training batch of this process: int64 (steps, batch_size)."""
    _check_process(process_index, num_processes, batch_size)
    if n < 1:
        raise ValueError(f"expected a non-empty dataset, found {n} samples")
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), epoch, _ORDER_TAG]))
    perm = rng.permutation(n).astype(np.int64)
    per_step = num_processes * batch_size
    steps = max(1, n // per_step)
    order = np.resize(perm, steps * per_step)  # repeats the permutation only when n < per_step
    return order.reshape(steps, num_processes, batch_size)[:, process_index].copy()


def eval_order(n: int, batch_size: int, process_index: int, num_processes: int) -> np.ndarray:
    """The sample indices of every evaluation batch of this process, -1 for padding."""
    _check_process(process_index, num_processes, batch_size)
    per_step = num_processes * batch_size
    steps = max(1, -(-n // per_step))
    order = np.full(steps * per_step, -1, dtype=np.int64)
    order[:n] = np.arange(n)
    return order.reshape(steps, num_processes, batch_size)[:, process_index].copy()


class IndexDataset(Dataset):
    """Maps a (sample index, view) key to (uint8 image or None, label, index, view, bad)."""

    def __init__(self, index: DatasetIndex, plan: AugPlan | None, eval_tf: EvalTransform) -> None:
        self.index = index
        self.plan = plan  # None: evaluation, use eval_tf
        self.eval_tf = eval_tf
        self.size = plan.size if plan is not None else eval_tf.size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> Item:
        i, view = key
        if i < 0:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), 0, -1, -1, None
        label = int(self.index.labels[i])
        try:
            img = self.index.load(i)
        except UnreadableSample as err:
            return None, label, i, view, err.bad
        if self.plan is None:
            return self.eval_tf(img), label, i, -1, None
        return train_image(img, self.plan, i, view), label, i, view, None


class Collate:
    """Stacks items into a batch; bad items are dropped (train) or made padding (eval)."""

    def __init__(self, size: int, train: bool) -> None:
        self.size = size
        self.train = train

    def __call__(self, items: Sequence[Item]) -> Collated:
        bad = [it[4] for it in items if it[4] is not None]
        if self.train:
            kept = [it for it in items if it[0] is not None]
        else:
            pad = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            kept = [it if it[0] is not None else (pad, 0, -1, -1, None) for it in items]
        if kept:
            images = torch.stack([it[0] for it in kept])  # type: ignore[misc]
        else:
            images = torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        labels = torch.tensor([it[1] for it in kept], dtype=torch.int64)
        index = torch.tensor([it[2] for it in kept], dtype=torch.int64)
        view = torch.tensor([it[3] for it in kept], dtype=torch.int64)
        return images, labels, index, view, bad


class _Batches(Sampler[list[Key]]):
    def __init__(self, order: np.ndarray, views: np.ndarray) -> None:
        self.order, self.views = order, views

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[list[Key]]:
        for row, view in zip(self.order.tolist(), self.views.tolist(), strict=True):
            yield [(i, view if i >= 0 else -1) for i in row]


class OrderedBatches:
    """What every loader backend shares: a fixed order of batches (cut at ``start_step`` for a
    resumed epoch), one view, and unreadable samples recorded once each and added to
    ``index.bad``. Subclasses implement ``_batches(order)``: the Batch of each row of ``order``.
    """

    def __init__(
        self,
        index: DatasetIndex,
        order: np.ndarray,
        view: int,
        start_step: int,
        workers: int,
        train: bool,
    ) -> None:
        if not 0 <= start_step <= len(order):
            raise ValueError(f"expected 0 <= start_step <= {len(order)}, found {start_step}")
        if workers < 0:
            raise ValueError(f"data.workers: expected >= 0, found {workers}")
        self.index = index
        self.order = order
        self.view = view
        self.steps_per_epoch = len(order)
        self.start_step = start_step
        self.workers = workers
        self.train = train
        self._bad: dict[int, BadSample] = {}

    def __len__(self) -> int:
        """The number of batches iteration yields (the epoch's steps after ``start_step``)."""
        return self.steps_per_epoch - self.start_step

    def indices(self) -> np.ndarray:
        """The sample indices of the batches iteration yields, before bad samples are dropped."""
        return self.order[self.start_step :]

    def __iter__(self) -> Iterator[Batch]:
        order = self.order[self.start_step :]
        if len(order) == 0:
            return iter(())
        return self._batches(order)

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        raise NotImplementedError

    def _record(self, bad: list[BadSample]) -> None:
        for b in bad:
            self._bad.setdefault(b.index, BadSample(int(b.index), str(b.path), str(b.error)))
        self.index.record_bad(bad)

    def bad_samples(self) -> list[BadSample]:
        """Samples found unreadable so far by this loader, by index."""
        return [self._bad[i] for i in sorted(self._bad)]


class _Loader(OrderedBatches):
    """The torchvision backend: a DataLoader over ``dataset`` in the fixed order."""

    def __init__(
        self,
        dataset: IndexDataset,
        order: np.ndarray,
        view: int,
        start_step: int,
        workers: int,
        train: bool,
    ) -> None:
        super().__init__(dataset.index, order, view, start_step, workers, train)
        self.dataset = dataset

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        views = np.full(len(order), self.view, dtype=np.int64)
        loader: DataLoader[Any] = DataLoader(
            self.dataset,
            batch_sampler=_Batches(order, views),
            num_workers=self.workers,
            collate_fn=Collate(self.dataset.size, self.train),
            pin_memory=torch.cuda.is_available(),
        )
        for images, labels, index, view, bad in loader:
            if bad:
                self._record(bad)
            yield Batch(images=images, labels=labels, index=index, view=view)


class TrainLoader(_Loader):
    """One epoch of training batches for one process (see the module docstring)."""

    def __init__(
        self,
        dataset: IndexDataset,
        order: np.ndarray,
        epoch: int,
        view: int,
        start_step: int,
        workers: int,
    ) -> None:
        super().__init__(dataset, order, view, start_step, workers, train=True)
        self.epoch = epoch


class EvalLoader(_Loader):
    """All samples once across processes, in order, padded with index -1."""

    def __init__(self, dataset: IndexDataset, order: np.ndarray, workers: int) -> None:
        super().__init__(dataset, order, -1, 0, workers, train=False)


def training_order(
    spec: DataSpec, n: int, seed: int, epoch: int, process_index: int, num_processes: int
) -> np.ndarray:
    """The (steps, batch_size) training order of one process, for every backend:
    ``train_order`` unless ``data.sampler`` asks for another (CoSS neighbour batches)."""
    from pipeline.data.coss_sampler import order_function  # it imports this module

    order_fn = order_function(spec, n)
    return order_fn(n, spec.batch_size, seed, epoch, process_index, num_processes)


def build_train_loader(
    index: DatasetIndex,
    spec: DataSpec,
    plan: AugPlan,
    epoch: int,
    seed: int,
    process_index: int,
    num_processes: int,
    start_step: int = 0,
) -> TrainLoader:
    """The training batches of ``epoch`` for process ``process_index`` of ``num_processes``."""
    order = training_order(spec, len(index), seed, epoch, process_index, num_processes)
    dataset = IndexDataset(index, plan, EvalTransform.from_spec(spec))
    view = view_for_epoch(epoch, spec.views)
    return TrainLoader(dataset, order, epoch, view, start_step, spec.workers)


def build_eval_loader(
    index: DatasetIndex, spec: DataSpec, process_index: int, num_processes: int
) -> EvalLoader:
    """Every sample of ``index`` once across processes (padding: index -1), eval transform."""
    order = eval_order(len(index), spec.eval_batch_size, process_index, num_processes)
    dataset = IndexDataset(index, None, EvalTransform.from_spec(spec))
    return EvalLoader(dataset, order, spec.workers)
