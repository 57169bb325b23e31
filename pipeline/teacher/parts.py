"""Parts of the teacher's weights that a method uses besides the teacher's outputs.

Some methods need more of the teacher than what it computes on a batch: SRRL runs the student's
features through the teacher's **classifier** (Yang et al., ICLR 2021), OFD places its margin at
the statistics of the **BatchNorm before each stage's final ReLU** (Heo et al., ICCV 2019). A
cached teacher has no network at training time, so these parts are taken from the teacher's
weights when the run is built (``pipeline.train.build``), for the online and the cached source
alike, and handed to the method in ``MethodContext.teacher_parts``. A method asks for them with
``Requirements.teacher_modules`` (``classifier``, ``preact_bn``).

- ``classifier``: a deep copy of the teacher's last ``nn.Linear`` (``last_linear(net.classifier)``;
  a dropout in front of it, as in torchvision's MobileNetV2, is inactive in the eval-mode teacher
  and left out), in eval mode with ``requires_grad=False``. A method that registers it as a
  sub-module moves it to the run's device with itself; the optimiser skips parameters without
  ``requires_grad`` and the trainer saves it with the method (``method.pt``), never in
  ``student.pt``.
- ``preact_bn``: ``{stage index: BatchNormStats}`` for the selected teacher stages, from
  ``Net.preact_bn(index)`` (each network file says which BN that is); a stage without one is an
  error naming the network and the stage.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from pipeline.models.zoo_utils import last_linear


def _copy(t: Tensor) -> Tensor:
    return t.detach().float().cpu().clone()


@dataclass(frozen=True)
class BatchNormStats:
    """A BatchNorm's affine parameters and running statistics (detached float32 CPU copies)."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> BatchNormStats:
        if bn.weight is None or bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"teacher parts: expected an affine BatchNorm with running statistics,"
                             f" found {bn!r}")
        return cls(_copy(bn.weight), _copy(bn.bias), _copy(bn.running_mean),
                   _copy(bn.running_var), float(bn.eps))


@dataclass
class TeacherParts:
    """What ``Requirements.teacher_modules`` asked for (module docstring); unused fields empty."""

    classifier: nn.Linear | None = None
    preact_bn: dict[int, BatchNormStats] = field(default_factory=dict)


def frozen_classifier(net: nn.Module) -> nn.Linear:
    """A frozen copy of ``net``'s last linear layer (its classifier)."""
    head = getattr(net, "classifier", None)
    if head is None:
        raise ValueError(f"teacher parts: {type(net).__name__} has no 'classifier' to copy")
    fc = copy.deepcopy(last_linear(head)).eval()
    fc.requires_grad_(False)
    return fc


def preact_bn_stats(net: nn.Module, stages: Iterable[int]) -> dict[int, BatchNormStats]:
    """``{stage: BatchNormStats}`` of the BN before each stage's final ReLU (``Net.preact_bn``)."""
    out: dict[int, BatchNormStats] = {}
    for index in stages:
        finder = getattr(net, "preact_bn", None)
        bn = finder(index) if finder is not None else None
        if bn is None:
            raise ValueError(
                f"teacher parts: {type(net).__name__} has no BatchNorm right before a ReLU at the "
                f"end of stage {index}; methods that read the teacher's BN statistics (OFD) need "
                "a teacher whose selected stages end in BN + ReLU (ResNets, WRNs, VGGs here)")
        out[index] = BatchNormStats.of(bn)
    return out


def extract_teacher_parts(net: nn.Module, modules: Iterable[str],
                          stages: Iterable[int] = ()) -> TeacherParts | None:
    """The parts ``modules`` names, from the teacher network ``net`` with its weights loaded;
    ``stages`` are the resolved teacher stage indices the method reads. None when ``modules``
    is empty."""
    modules = tuple(modules)
    if not modules:
        return None
    return TeacherParts(
        classifier=frozen_classifier(net) if "classifier" in modules else None,
        preact_bn=preact_bn_stats(net, stages) if "preact_bn" in modules else {},
    )
