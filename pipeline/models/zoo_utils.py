"""Small pieces shared by the model files: pooling, stage running, channel shuffle, heads.

``run_stage`` is how every residual net here produces pre-activation stage maps without forward
hooks and without running anything twice: a block that ends in a ReLU offers
``forward_pair(x) -> (relu(z), z)``, and only the last block of a stage is asked for the pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def global_pool(x: Tensor) -> Tensor:
    """Global average pool and flatten: (N, C, H, W) -> (N, C).

    At the native 32x32 input this equals the fixed-size pools of the CRD code (``AvgPool2d(8)``
    on an 8x8 map, ``avg_pool2d(out, 4)`` on a 4x4 map), and it keeps working at other sizes.
    """
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def run_stage(stage: nn.Sequential, x: Tensor, preact: bool) -> tuple[Tensor, Tensor | None]:
    """Run a stage of blocks; with ``preact`` also return the last block's pre-ReLU output.

    Without ``preact`` the stage runs as an ordinary module call (hooks fire, no extra work).
    """
    if not preact:
        return stage(x), None
    *head, last = list(stage)
    for block in head:
        x = block(x)
    return last.forward_pair(x)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: (N, g*c, H, W) -> view (N, g, c) -> transpose -> flatten."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class LinearHead(nn.Sequential):
    """A classifier head kept as a Sequential for its checkpoint names (``classifier.0.*`` in
    CRD's MobileNetV2, ``classifier.1.*`` after torchvision's dropout) that reads like the
    ``nn.Linear`` it ends in: ``weight``, ``bias``, ``in_features``, ``out_features``, and
    ``linear`` for the layer itself. Calling it runs the whole head (dropout included)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise TypeError(f"LinearHead: expected layers ending in an nn.Linear, got {layers}")

    @property
    def linear(self) -> nn.Linear:
        return self[-1]

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


def last_linear(head: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` of a head that is a Linear or a Sequential ending in one."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"expected a classifier head holding an nn.Linear, found {head!r}")
    return linears[-1]


def he_init(model: nn.Module, linear_std: float | None = None,
            zero_linear_bias: bool = False) -> None:
    """He-normal convs (std sqrt(2 / (k*k*out_channels)), zero bias), BN weight 1 and bias 0.

    Linear layers keep PyTorch's default unless ``linear_std`` is given (then N(0, std), bias 0),
    as in the VGG and MobileNetV2 code of the CRD zoo; ``zero_linear_bias`` keeps the default
    weight and zeroes the bias (the original WRN code).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
