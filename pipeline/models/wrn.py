"""Wide ResNets WRN-d-w of the CRD model zoo: wrn_16_1/2/4, wrn_40_1/2/4 (any d = 6n+4 via
``wide_resnet``).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, Table 1: a 3x3 stem to 16 channels,
three stages of n = (d - 4) / 6 pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) at
widths 16w/32w/64w and strides 1/2/2, a final BN-ReLU and global average pooling, so the
embedding is 64w-d (methods.md §0.3). Dropout 0 as in the distillation papers.

Parameter names and shapes equal HobbitLong/RepDistiller ``models/wrn.py`` (``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so CRD's
released teachers (e.g. ``wrn_40_2_vanilla/ckpt_epoch_240.pth``) load with ``strict=True``.

Stage maps follow the CRD code, on which the published feature-distillation numbers rest. In a
pre-activation net the stage output is a raw residual sum, so ``feats = [stem conv, block1,
block2, block3]`` are those sums (no ReLU), and with ``preact`` the three stage maps are the same
sums after the BN that follows each (the next stage's first ``bn1``, or the final ``bn1``). The
CRD code evaluates those BNs a second time to get them, which updates their running statistics
twice per step in training; here each BN output is taken from the one forward pass instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import global_pool, he_init
from pipeline.types import FeatureRequest, ModelOutput


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the input, or a 1x1 ``convShortcut`` of the activated
    input when the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut: nn.Conv2d | None = None  # RepDistiller's (checkpoint) name
        if cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, ``bn1(x)``: the block's input after BN and before its ReLU)."""
        pre = self.bn1(x)
        act = F.relu(pre)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut, pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pair(x)[0]


class WideStage(nn.Module):
    """A stage of pre-activation blocks, held in ``layer`` (RepDistiller's ``NetworkBlock``)."""

    def __init__(self, blocks: int, cin: int, cout: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
            for i in range(blocks)
        ])

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(stage output, ``bn1`` of the stage input: the previous stage's pre-ReLU map)."""
        first, *rest = list(self.layer)
        out, pre_in = first.forward_pair(x)
        for block in rest:
            out = block(out)
        return out, pre_in

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(Net):
    """WRN-``depth``-``width`` for 32x32 inputs."""

    native_size = 32
    stage_names = ("stem", "block1", "block2", "block3")

    def __init__(self, depth: int, width: int, num_classes: int = 100,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4 (10, 16, 22, 28, 40, ...), "
                             f"got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet: width must be a positive integer, got {width}")
        n = (depth - 4) // 6
        c = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, c[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, c[0], c[1], 1, drop_rate)
        self.block2 = WideStage(n, c[1], c[2], 2, drop_rate)
        self.block3 = WideStage(n, c[2], c[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        self.embedding_dim = c[3]
        he_init(self, zero_linear_bias=True)  # the original WRN code's initialisation

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (stored as ``fc``, RepDistiller's name; replace ``fc``)."""
        return self.fc

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """The BN that makes stage ``index``'s pre-ReLU map (module docstring): the next stage's
        first ``bn1`` for stages 1-2, the final ``bn1`` for stage 3 (OFD's
        ``get_bn_before_relu``). Its output is exactly that map."""
        return {1: self.block2.layer[0].bn1, 2: self.block3.layer[0].bn1, 3: self.bn1}.get(index)

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        if feats and preact:
            f2, p1 = self.block2.forward_pair(f1)
            f3, p2 = self.block3.forward_pair(f2)
        else:
            f2 = self.block2(f1)
            f3 = self.block3(f2)
        p3 = self.bn1(f3)
        embedding = global_pool(F.relu(p3))
        maps = None
        if feats:
            maps = [f0, p1, p2, p3] if preact else [f0, f1, f2, f3]
        return ModelOutput(self.fc(embedding), embedding, pick_stages(maps, feats))


def wide_resnet(depth: int, width: int, num_classes: int) -> WideResNet:
    """Any WRN-d-w (d = 6n+4); the registered ones are those of the distillation papers."""
    return WideResNet(depth, width, num_classes)


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int) -> WideResNet:
    return wide_resnet(16, 1, num_classes)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int) -> WideResNet:
    return wide_resnet(16, 2, num_classes)


@MODELS.register("wrn_16_4")
def wrn_16_4(num_classes: int) -> WideResNet:
    return wide_resnet(16, 4, num_classes)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int) -> WideResNet:
    return wide_resnet(40, 1, num_classes)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int) -> WideResNet:
    return wide_resnet(40, 2, num_classes)


@MODELS.register("wrn_40_4")
def wrn_40_4(num_classes: int) -> WideResNet:
    return wide_resnet(40, 4, num_classes)
