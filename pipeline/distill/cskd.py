"""CSKD: Chen, Zheng, Shen, Zeng, Zhou & Zhao, ECCV 2020, "Improving Knowledge Distillation via
Category Structure" — an **adaptation** of the authors' code to the CRD networks.

The student matches the teacher's category structure within each batch: the intra-category
structure (each sample's offset from its class centre) and the inter-category structure (the
cosine similarities among the class centres), on a feature map and on the logits. As the only
public code computes it (xeanzheng/CSKD ``train_cifar.py``, commit abfff21; baselines.md §13),
with MSE the mean over all elements, sg the stop-gradient, F the maps and z the logits:

- centres per class present in the batch: plain means ``C`` (used for the logits and for every
  inter-class term) and *filtered* means ``C̃`` over the samples the network itself classifies
  correctly (the teacher's predictions for the teacher, the student's for the student); a sample
  whose class has no correct sample gets its own feature as its centre (offset 0);
- intra = i_w·[MSE(F_t − C̃_t, F_s − sg(C̃_s)) / (C·H·W) + MSE(z_t − C^z_t, z_s − sg(C^z_s)) /
  classes] + p_w·MSE(z_s, sg(C^z_s)), with i_w = 0.002 and p_w = 0.1 (the code's constants);
- inter = e_w·[MSE(G_t, G_s) / K + MSE(G^z_t, G^z_s) / K], e_w = 0.04, G the K × K cosine
  matrix of the plain centres of the K classes in the batch (maps flattened over C·H·W);
- the code's total: 0.9·CE + intra + inter + 0.1·1e-5·MSE(z_t, z_s).

What is adapted (the code is tied to the authors' own ResNets with 1×1 "branch" projections of
every stage, and CID's reported CSKD rows, Table 2, do not say how they adapted it; we follow
baselines.md §13's recommendation):
- the feature map is the **last stage map** of the CRD networks (stage -1; ``stage`` selects
  another) of student and teacher, not the authors' projected f4; where the channels differ a
  bias-free 1×1 conv (the code's ``conv1x1`` branch, Kaiming-normal fan-out) maps the student's
  map onto the teacher's channels and trains with the student; where the sizes differ, the larger
  map is average-pooled to the smaller one (``feature_ops.match_spatial``);
- the tiny logit MSE (weight 1e-6) is dropped by default (``logit_mse_weight: 0``) because the
  CID tables add KD; ``logit_mse_weight: 1.0e-6`` restores it;
- the CE weight defaults to 1 (CID eq. 1's CE + KD + c·L); ``ce_weight: 0.9`` is the code's;
- cosines divide by max(‖a‖‖b‖-ish, 1e-12) (``F.normalize``), where the code would give NaN for
  an all-zero class centre.
The code's other choices (per-epoch re-created optimiser, CIFAR-10 normalisation on CIFAR-100, a
teacher in train mode) are recipe, not loss, and are not reproduced.

Terms: ``ce`` (when ce_weight > 0), ``cskd_intra`` and ``cskd_inter`` (each × beta), and
``cskd_logit_mse`` when its weight is > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.feature_ops import match_spatial
from pipeline.distill.losses import cross_entropy
from pipeline.distill.options import check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput


def class_means(x: Tensor, labels: Tensor, num_classes: int,
                keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(per-class means of the rows of ``x`` (num_classes, ...), per-class counts), over the
    rows where ``keep`` is true (all rows by default)."""
    flat = x.reshape(x.shape[0], -1)
    weight = torch.ones_like(labels, dtype=flat.dtype) if keep is None else keep.to(flat.dtype)
    sums = flat.new_zeros(num_classes, flat.shape[1]).index_add(0, labels, flat * weight[:, None])
    counts = flat.new_zeros(num_classes).index_add(0, labels, weight)
    means = sums / counts.clamp_min(1)[:, None]
    return means.reshape(num_classes, *x.shape[1:]), counts


def sample_centres(x: Tensor, labels: Tensor, num_classes: int,
                   keep: Tensor | None = None) -> Tensor:
    """Each row's class centre; with ``keep`` (the code's ``cluster_filter``) the centre of the
    kept rows of its class, or the row itself where its class has none."""
    means, counts = class_means(x, labels, num_classes, keep)
    centres = means[labels]
    if keep is None:
        return centres
    empty = (counts[labels] == 0).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(empty, x, centres)


def centre_cosines(x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """K × K cosine similarities of the plain centres of the classes present, by class index."""
    means, counts = class_means(x, labels, num_classes)
    present = means[counts > 0].flatten(1)
    unit = F.normalize(present, dim=1, eps=1e-12)
    return unit @ unit.t()


def _work(t: Tensor) -> Tensor:
    """float32 (float64 inputs stay float64, for tests)."""
    return t if t.dtype == torch.float64 else t.float()


def cskd_parts(f_s: Tensor, f_t: Tensor, z_s: Tensor, z_t: Tensor, labels: Tensor,
               weights: tuple[float, float, float] = (0.002, 0.1, 0.04),
               filtered: bool = True) -> tuple[Tensor, Tensor]:
    """(intra, inter) of the code (module docstring) for maps of equal shape."""
    i_w, p_w, e_w = weights
    classes = z_s.shape[1]
    f_s, f_t, z_s, z_t = _work(f_s), _work(f_t).detach(), _work(z_s), _work(z_t).detach()
    y = labels.long()
    keep_t = z_t.argmax(1) == y if filtered else None
    keep_s = z_s.detach().argmax(1) == y if filtered else None
    dev_t = f_t - sample_centres(f_t, y, classes, keep_t)
    dev_s = f_s - sample_centres(f_s, y, classes, keep_s).detach()
    logit_centres_s = sample_centres(z_s, y, classes).detach()
    intra_map = F.mse_loss(dev_s, dev_t) / f_t[0].numel()
    intra_logit = F.mse_loss(z_s - logit_centres_s, z_t - sample_centres(z_t, y, classes))
    intra = i_w * (intra_map + intra_logit / classes) + p_w * F.mse_loss(z_s, logit_centres_s)
    g_t, g_s = centre_cosines(f_t, y, classes), centre_cosines(f_s, y, classes)
    gz_t, gz_s = centre_cosines(z_t, y, classes), centre_cosines(z_s, y, classes)
    k = g_t.shape[0]
    inter = e_w * (F.mse_loss(g_s, g_t) / k + F.mse_loss(gz_s, gz_t) / k)
    return intra, inter


@dataclass
class CSKDOptions:
    """Config keys of ``method: {name: cskd, ...}`` (module docstring for what is adapted)."""

    ce_weight: float = 1.0
    beta: float = 1.0  # the method's weight (c of the CID "+KD" form)
    stage: int = -1  # the feature map: a stage index of both networks
    intra_weight: float = 0.002
    centre_pull_weight: float = 0.1
    inter_weight: float = 0.04
    logit_mse_weight: float = 0.0  # the code: 0.1 · 1e-5
    filtered: bool = True  # the code's use_filter

    def __post_init__(self) -> None:
        check_weights(self, "ce_weight", "beta", "intra_weight", "centre_pull_weight",
                      "inter_weight", "logit_mse_weight")
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage == 0:
            raise ValueError(f"stage: expected a stage index other than the stem (0), e.g. -1 "
                             f"for the last stage, found {self.stage!r}")


@METHODS.register("cskd")
class CSKD(Method):
    """Category-structure KD on the last stage map and the logits (an adaptation)."""

    Options = CSKDOptions

    @classmethod
    def requirements(cls, opts: CSKDOptions) -> Requirements:
        return Requirements(teacher_fields=("logits",), teacher_stages=(opts.stage,),
                            student_stages=(opts.stage,))

    def __init__(self, opts: CSKDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        (s_map,), (t_map,) = ctx.student_maps((opts.stage,)), ctx.teacher_maps((opts.stage,))
        self.s_index, self.t_index = s_map.index, t_map.index
        self.branch: nn.Module = nn.Identity()
        if s_map.channels != t_map.channels:
            conv = nn.Conv2d(s_map.channels, t_map.channels, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.branch = conv

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        if teacher is None or teacher.logits is None or not teacher.feats:
            raise ValueError("method cskd: expected the teacher's logits and stage map")
        if not student.feats:
            raise ValueError("method cskd: expected the student's stage map, found none")
        o = self.opts
        f_s, f_t = match_spatial(self.branch(student.feats[self.s_index]),
                                 teacher.feats[self.t_index])
        weights = (o.intra_weight, o.centre_pull_weight, o.inter_weight)
        intra, inter = cskd_parts(f_s, f_t, student.logits, teacher.logits, batch.labels,
                                  weights, o.filtered)
        terms = {"cskd_intra": o.beta * intra, "cskd_inter": o.beta * inter}
        if o.logit_mse_weight > 0:
            terms["cskd_logit_mse"] = o.logit_mse_weight * F.mse_loss(
                student.logits.float(), teacher.logits.float())
        if o.ce_weight > 0:
            terms["ce"] = o.ce_weight * cross_entropy(student.logits, batch.labels)
        return terms
