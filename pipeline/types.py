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
    ``rotation`` is None, or, in a run with ``data.rotations: 4`` (SSKD, HSAKD), k of each row's
    rotation by k·90° (``pipeline.data.rotate``: the copies of an image are interleaved and
    share its label, index and view).
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    view: Tensor
    rotation: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.index.to(device, non_blocking=True),
            self.view.to(device, non_blocking=True),
            None if self.rotation is None else self.rotation.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class StageInfo:
    """One stage map a network can return (``Net.stage_info``), at a given input size.

    ``index`` is the stage's position in the network's stage list (0: the stem, then one entry
    per stage), the key under which ``ModelOutput.feats`` holds its map. ``stride`` is the input
    size divided by the map size. ``has_preact`` says whether ``preact=True`` returns a map that
    differs from the post-activation one (False where a stage ends without an activation: a
    MobileNetV2 linear bottleneck, a timm network, the stem).
    """

    index: int
    name: str
    channels: int
    height: int
    width: int
    stride: int
    has_preact: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample's map."""
        return (self.channels, self.height, self.width)


@dataclass
class ModelOutput:
    """What every network returns: logits, pooled penultimate embedding, optional stage maps.

    ``feats`` maps a stage index (``StageInfo.index``) to its (N, C, H, W) map; it holds only
    the stages that were asked for, and is None when none were.
    """

    logits: Tensor
    embedding: Tensor
    feats: dict[int, Tensor] | None = None


@dataclass
class TeacherOutput:
    """The teacher's answer for a batch, from an online model or the on-disk cache.

    Fields a method did not ask for are None.
    """

    logits: Tensor | None = None
    embedding: Tensor | None = None
    feats: dict[int, Tensor] | None = None  # stage index → map, the stages the method reads
    extra: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, out: ModelOutput) -> TeacherOutput:
        return cls(logits=out.logits, embedding=out.embedding, feats=out.feats)

    def detached(self) -> TeacherOutput:
        return replace(
            self,
            logits=None if self.logits is None else self.logits.detach(),
            embedding=None if self.embedding is None else self.embedding.detach(),
            feats=None if self.feats is None else {k: f.detach() for k, f in self.feats.items()},
        )


TEACHER_FIELDS = ("logits", "embedding", "feats")
FeatureRequest = bool | tuple[int, ...]
"""What ``Net.forward(x, feats=...)`` takes: False (no maps), True (every stage) or the stage
indices to return."""
