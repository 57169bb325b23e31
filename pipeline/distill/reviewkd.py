"""ReviewKD: Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review"
(baselines.md §15; official code dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py#L20-177``,
``CIFAR-100/train.py``; mdistiller ``distillers/ReviewKD.py``).

L = ce_weight·CE(z_s, y) + beta·w(e)·Σ_levels HCL(F_l, T_l)   (the paper's eq. 6 with ABF and
HCL as coded).

- **Levels**: the student's stage maps (``student_stages``, every stage after the stem by
  default) plus its pooled vector as a 1×1 map, shallow to deep; the teacher's the same way.
  The stem is not a level (the official zip drops it). The counts must agree.
- **Review chain** (``ReviewChain``): one ABF per level. From the deepest level up, ABF(x, y)
  = conv2(resize(fuse(conv1(x), y))) where conv1 = 1×1 conv + BN (C_s → mid), the fusion (all
  levels but the deepest) upsamples the residual y of the level below (nearest) and mixes
  x·a₀ + y·a₁ with a = sigmoid(1×1 conv(concat(x, y)) → 2 maps), resize is a nearest resize to
  the teacher's size where it differs, conv2 = 3×3 conv + BN (mid → C_t); the residual passed
  on is the fused map after the resize. mid = min(``max_mid_channels``, student pooled width);
  conv1/conv2 weights kaiming_uniform(a=1).
- **HCL** per level (``hcl_level``): MSE(F, T) plus, for l in ``pool_sizes`` (4, 2, 1) with
  l < H, 2^-k·MSE(pool_l F, pool_l T) (adaptive average pooling, weights 1/2, 1/4, 1/8),
  divided by the sum of the weights used.
- **Stage flavours**: CIFAR (the official ``train.py#L220-224``): student after the ReLU (raw
  sums for WRN), teacher before it (``preact=True``; BN outputs for WRN): ``student_preact:
  false``, ``teacher_preact: true`` (the defaults). ImageNet: both before the ReLU (the
  official ResNet skips each stage's last ReLU): set ``student_preact: true``.
- **Warm-up** w(e) = min(1, e / ``warmup_epochs``): ``recipe: official`` counts epochs from 0
  (the first epoch has no HCL at all, ``train.py#L210, L225``), ``recipe: mdistiller`` from 1
  (w = 1/W in the first epoch). 0 disables it (the official ImageNet code has none).
- **Teacher BatchNorm**: the official CIFAR code never calls ``teacher.eval()``, so its teacher
  normalises with each batch's statistics. ``teacher_bn: batch`` (the default of ``recipe:
  official``) asks the online teacher for exactly that (``Requirements.teacher_batch_stats``;
  its running estimates stay untouched, they are never used); ``teacher_bn: eval`` (the default
  of ``recipe: mdistiller``, and what the official ImageNet code does) uses the running
  estimates, and is the only form a teacher cache can serve (it stores the maps and the
  embedding of the levels). Per process, the batch statistics are those of the local batch.

Recipes otherwise differ in the optimiser and batch (config keys, not method options): official
CIFAR batch 128, LR 0.1 (0.02 for ShuffleNet/MobileNet students), nesterov SGD, wd 5e-4 on all
parameters, no KD; weights per pair from ``script/reviewKD.sh`` (5.0 WRN-40-2→WRN-16-2 and
→WRN-40-1/ShuffleV1, resnet32x4→resnet8x4/ShuffleV1; 8.0 resnet32x4→ShuffleV2; 0.6
resnet56→resnet20; 1.0 resnet110→resnet32); mdistiller batch 64, LR 0.05, plain SGD, weight 5
for resnet32x4→resnet8x4. ImageNet: weight 1.0, no warm-up, teacher in eval mode. The ABFs are
trained with the student and saved in ``method.pt``.

Terms: ``ce`` (when ``ce_weight`` > 0) and ``reviewkd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

Size = tuple[int, int]
RECIPES = ("official", "mdistiller")
TEACHER_BN = {"official": "batch", "mdistiller": "eval"}


@dataclass
class ReviewKDOptions:
    """Config keys of ``method: {name: reviewkd, ...}``."""

    ce_weight: float = 1.0
    beta: float = 1.0  # the official --kd-loss-weight default; per-pair values in the configs
    recipe: Literal["official", "mdistiller"] = "official"
    warmup_epochs: float = 20.0
    student_stages: tuple[int | str, ...] = ("all",)
    teacher_stages: tuple[int | str, ...] = ("all",)
    student_preact: bool = False
    teacher_preact: bool = True
    teacher_bn: Literal["batch", "eval"] | None = None  # None: the recipe's (module docstring)
    max_mid_channels: int = 512
    pool_sizes: tuple[int, ...] = (4, 2, 1)

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: expected one of {list(RECIPES)}, found {self.recipe!r}")
        if self.teacher_bn not in (None, "batch", "eval"):
            raise ValueError(f"teacher_bn: expected 'batch', 'eval' or null, found "
                             f"{self.teacher_bn!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: expected >= 0 (0: none), found {self.warmup_epochs}")
        if self.max_mid_channels < 1 or any(s < 1 for s in self.pool_sizes):
            raise ValueError(f"max_mid_channels, pool_sizes: expected values >= 1, found "
                             f"{self.max_mid_channels} and {list(self.pool_sizes)}")
        if not self.student_stages or not self.teacher_stages:
            raise ValueError("student_stages, teacher_stages: expected at least one stage each "
                             f"(or 'all'), found {list(self.student_stages)} and "
                             f"{list(self.teacher_stages)}")

    @property
    def resolved_teacher_bn(self) -> str:
        return self.teacher_bn or TEACHER_BN[self.recipe]


def hcl_level(fs: Tensor, ft: Tensor, pool_sizes: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """The hierarchical context loss of one level (module docstring), maps (N, C, H, W)."""
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for size in pool_sizes:
        if size >= fs.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size),
                                          F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


def hcl(student: list[Tensor], teacher: list[Tensor],
        pool_sizes: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """Σ over levels of ``hcl_level`` (the official ``hcl``), in float32."""
    pairs = zip(student, teacher, strict=True)
    return sum((hcl_level(s.float(), t.float(), pool_sizes) for s, t in pairs),
               start=torch.zeros((), device=student[0].device))


class ABF(nn.Module):
    """Attention-based fusion of one level (module docstring)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Size  # type: ignore[override]
                ) -> tuple[Tensor, Tensor]:
        """(output for the teacher's level, residual for the next, shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            a = self.att_conv(torch.cat([x, y], dim=1))
            x = x * a[:, 0:1] + y * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewChain(nn.Module):
    """The ABFs of all levels; ``forward`` takes the student's level maps shallow → deep and
    returns the outputs for the teacher's levels in the same order."""

    def __init__(self, in_channels: list[int], out_channels: list[int], out_sizes: list[Size],
                 mid_channels: int) -> None:
        super().__init__()
        n = len(in_channels)
        self.out_sizes = [tuple(s) for s in out_sizes]
        self.abfs = nn.ModuleList(
            ABF(c_in, mid_channels, c_out, fuse=i < n - 1)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels, strict=True)))

    def forward(self, levels: list[Tensor]) -> list[Tensor]:  # type: ignore[override]
        outputs: list[Tensor] = []
        residual = None
        for i in reversed(range(len(levels))):
            out, residual = self.abfs[i](levels[i], residual, self.out_sizes[i])
            outputs.insert(0, out)
        return outputs


def as_map(embedding: Tensor) -> Tensor:
    """The pooled vector (N, C) as a 1×1 map (N, C, 1, 1)."""
    return embedding.reshape(embedding.shape[0], -1, 1, 1)


@METHODS.register("reviewkd")
class ReviewKD(Method):
    """Knowledge review: ABF fusion and the hierarchical context loss. Terms: ``ce``,
    ``reviewkd``."""

    Options = ReviewKDOptions

    @classmethod
    def requirements(cls, opts: ReviewKDOptions) -> Requirements:
        return Requirements(
            teacher_fields=("embedding",), teacher_stages=tuple(opts.teacher_stages),
            student_stages=tuple(opts.student_stages), student_preact=opts.student_preact,
            teacher_preact=opts.teacher_preact, uses_student_logits=opts.ce_weight > 0,
            teacher_batch_stats=opts.resolved_teacher_bn == "batch")

    @classmethod
    def check_run(cls, opts: ReviewKDOptions, epochs: int) -> None:
        if epochs > 0 and opts.warmup_epochs > epochs:
            raise ValueError(f"warmup_epochs: {opts.warmup_epochs} is more than the run's "
                             f"{epochs} epochs: the loss would never reach its full weight")

    def __init__(self, opts: ReviewKDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method reviewkd: expected the teacher's stage maps and embedding "
                             "size, found no teacher")
        s_maps = ctx.student_maps(tuple(opts.student_stages))
        t_maps = ctx.teacher_maps(tuple(opts.teacher_stages))
        if len(s_maps) != len(t_maps):
            raise ValueError(
                f"method reviewkd: student_stages and teacher_stages: expected as many student "
                f"as teacher stage maps, found {[m.name for m in s_maps]} and "
                f"{[m.name for m in t_maps]}; select stages so that they pair up")
        self.student_indices = tuple(m.index for m in s_maps)
        self.teacher_indices = tuple(m.index for m in t_maps)
        self.chain = ReviewChain(
            in_channels=[m.channels for m in s_maps] + [ctx.student_dim],
            out_channels=[m.channels for m in t_maps] + [int(ctx.teacher_dim)],
            out_sizes=[(m.height, m.width) for m in t_maps] + [(1, 1)],
            mid_channels=min(opts.max_mid_channels, ctx.student_dim),
        )

    def warmup_factor(self) -> float:
        """min(1, e / W) with e counted from 0 (official) or 1 (mdistiller)."""
        w = self.opts.warmup_epochs
        if w <= 0:
            return 1.0
        e = self.epoch + (1 if self.opts.recipe == "mdistiller" else 0)
        return min(1.0, e / w)

    def levels(self, student: ModelOutput, teacher: TeacherOutput | None
               ) -> tuple[list[Tensor], list[Tensor]]:
        """(student levels, teacher levels), shallow → deep, pooled vectors last."""
        if teacher is None or teacher.feats is None or teacher.embedding is None:
            raise ValueError("method reviewkd: expected the teacher's stage maps and embedding, "
                             "found none")
        if student.feats is None:
            raise ValueError("method reviewkd: expected the student's stage maps, found none")
        s = [student.feats[i] for i in self.student_indices] + [as_map(student.embedding)]
        t = [teacher.feats[i] for i in self.teacher_indices] + [as_map(teacher.embedding)]
        return s, t

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        s_levels, t_levels = self.levels(student, teacher)
        loss = hcl(self.chain(s_levels), t_levels, tuple(self.opts.pool_sizes))
        terms = {"reviewkd": self.opts.beta * self.warmup_factor() * loss}
        if self.opts.ce_weight > 0:
            terms["ce"] = self.opts.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
