"""PS-KD: Kim, Ji, Yoon & Hwang, ICCV 2021, "Self-Knowledge Distillation with Progressive
Refinement of Targets" — self-distillation without a teacher network.

The model of the previous epoch is its own teacher (paper eq. 5-7): in epoch t (of T) sample x
trains against the soft target (1 − α_t)·onehot(y) + α_t·P_{t−1}(x), α_t = α_T·t/T, with the
cross-entropy H(target, σ(z)) averaged over the batch. Because the target mixes linearly, the
loss splits exactly into the two returned terms:

    ce   = ce_weight·(1 − α_t)·CE(z, y)
    pskd = beta·α_t·H(P_{t−1}(x), σ(z))          (ce_weight = beta = 1 is PS-KD)

Which predictions are stored, as the authors' code does (lgcnsai/PS-KD-Pytorch ``main.py``,
``train``): P_t(x) = σ(z) at temperature 1 of the **training forward pass** of the step that
visits x in epoch t: the network in train mode (BatchNorm on batch statistics), on the view of x
that epoch's augmentation plan gives (``data.views``), with the weights before that step's
update; detached. The row of x is read (for its target) before it is overwritten in the same
step; x is visited once per epoch, so an epoch trains against the previous epoch's predictions.
α_t = α_T·(e + 1)/E with e the 0-based main-phase epoch and E = ``optim.epochs`` (the code's
``alpha_T * ((epoch + 1) / end_epoch)``); α_T = 0.8 (the paper's CIFAR-100 and ImageNet value).
The IPWD appendix (§1.2) follows PS-KD's recipe: 300 epochs, batch 128, LR 0.1 /10 at 150 and 225,
weight decay 5e-4 (the code uses Nesterov SGD).

State: ``predictions`` (N × C, ``ctx.num_train_samples`` × classes), initialised to the one-hot
labels. That is what the code's first epoch trains against (it writes the one-hot rows before
reading them in epoch 0); it also gives a sample the code never visited (a ``drop_last``
remainder, a capped epoch) a one-hot target where the code's zero-initialised matrix would give
(1 − α_t)·onehot — our only departure from the code. The buffer is saved in checkpoints (the
code's checkpoints leave it out, so its resumed runs lose it) and restored with the method.

Several processes: every step gathers the (index, prediction) rows of all processes
(``pipeline.dist.all_gather_rows``; batches may differ in size when unreadable samples were
dropped) and writes them on every process, so all hold the same buffer at every step; an index
present twice in one step (a dataset smaller than one global batch repeats samples) keeps its
first row in rank order. DistributedDataParallel's broadcast of rank 0's buffers at every forward
is switched off for it (``RANK_LOCAL_BUFFERS`` / ``compose.mark_rank_local_buffers``, as CID's
accumulators): it would only copy N × C floats each step (20 MB on CIFAR-100, 5 GB on ImageNet)
that are already equal. Memory: N·C·4 bytes on the run's device and in each checkpoint
(CIFAR-100: 20 MB; ImageNet: 5.1 GB), halved by ``buffer_dtype: float16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.dist import all_gather_rows
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def soft_cross_entropy(targets: Tensor, logits: Tensor) -> Tensor:
    """H(targets, σ(logits)) summed over classes, averaged over the batch (the code's
    ``Custom_CrossEntropy_PSKD``), in float32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def first_of_each(index: Tensor) -> tuple[Tensor, Tensor]:
    """(the distinct values of ``index``, the position of each one's first occurrence)."""
    distinct, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(distinct, index.numel()).scatter_reduce(0, inverse, positions, "amin")
    return distinct, first


@dataclass
class PSKDOptions:
    """Config keys of ``method: {name: pskd, ...}``."""

    alpha_T: float = 0.8
    ce_weight: float = 1.0
    beta: float = 1.0
    buffer_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if not 0 <= self.alpha_T <= 1:
            raise ValueError(f"alpha_T: expected a value in [0, 1], found {self.alpha_T}")
        if self.buffer_dtype not in DTYPES:
            raise ValueError(f"buffer_dtype: expected one of {tuple(DTYPES)}, found "
                             f"{self.buffer_dtype!r}")


@METHODS.register("pskd")
class PSKD(Method):
    """Progressive self-distillation against the previous epoch's own predictions."""

    Options = PSKDOptions
    needs = Requirements(needs_teacher=False, teacher_fields=())
    # Kept equal on every process by the method itself; DDP's broadcast must leave it alone.
    RANK_LOCAL_BUFFERS = ("predictions",)

    def __init__(self, opts: PSKDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        labels = ctx.train_labels
        if labels is None or ctx.num_train_samples < 1 or len(labels) != ctx.num_train_samples:
            raise ValueError("method pskd: needs the training labels of every sample "
                             "(MethodContext.train_labels, num_train_samples) for its buffer")
        one_hot = F.one_hot(torch.as_tensor(labels).long(), ctx.num_classes)
        self.register_buffer("predictions", one_hot.to(DTYPES[opts.buffer_dtype]))
        self.alpha_t = self.alpha_for(0)
        mark_rank_local_buffers(self)

    def alpha_for(self, epoch: int) -> float:
        """α_t = α_T·(epoch + 1)/E for the 0-based main-phase ``epoch``."""
        return max(0.0, self.opts.alpha_T * (epoch + 1) / max(self.ctx.epochs, 1))

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.alpha_t = self.alpha_for(epoch)

    @torch.no_grad()
    def store(self, index: Tensor, logits: Tensor) -> None:
        """Write σ(logits) into the rows ``index``, gathered from every process."""
        probs = F.softmax(logits.detach().float(), dim=1)
        index, probs = all_gather_rows(index.to(self.predictions.device).long(),
                                       probs.to(self.predictions.device))
        rows, first = first_of_each(index)
        self.predictions.index_copy_(0, rows, probs[first].to(self.predictions.dtype))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        index = batch.index.long()
        if bool((index < 0).any()):
            raise ValueError("method pskd: training batches must carry sample indices >= 0")
        z, a = student.logits, self.alpha_t
        previous = self.predictions[index.to(self.predictions.device)].to(z.device)
        terms = {"pskd": self.opts.beta * a * soft_cross_entropy(previous, z)}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * (1 - a) * cross_entropy(z, batch.labels)
        if self.training:
            self.store(index, z)
        return terms

    def epoch_metrics(self) -> dict[str, float]:
        return {"alpha_t": self.alpha_t}
