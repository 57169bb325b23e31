"""The contracts that tie the stages together (see DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """One mini-batch as every loader backend yields it.

    ``images`` is uint8 (N,3,H,W) straight from a CPU loader, or float and normalised when a
    backend already did that on the device; ``pipeline.data.device.to_device`` makes it float.
    ``index`` is each sample's position in the dataset index (-1 marks padding in evaluation),
    ``view`` the augmentation view it was drawn with (-1 for the deterministic eval view).
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    view: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.index.to(device, non_blocking=True),
            self.view.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModelOutput:
    """What every network returns: logits, pooled penultimate embedding, optional stage maps."""

    logits: Tensor
    embedding: Tensor
    feats: list[Tensor] | None = None


@dataclass
class TeacherOutput:
    """The teacher's answer for a batch, from an online model or the on-disk cache.

    Fields a method did not ask for are None.
    """

    logits: Tensor | None = None
    embedding: Tensor | None = None
    feats: list[Tensor] | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, out: ModelOutput) -> TeacherOutput:
        return cls(logits=out.logits, embedding=out.embedding, feats=out.feats)

    def detached(self) -> TeacherOutput:
        return replace(
            self,
            logits=None if self.logits is None else self.logits.detach(),
            embedding=None if self.embedding is None else self.embedding.detach(),
            feats=None if self.feats is None else [f.detach() for f in self.feats],
        )


TEACHER_FIELDS = ("logits", "embedding", "feats")
