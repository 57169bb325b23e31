"""CIFAR ResNets of the CRD model zoo: resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2: a 3x3 stem, three
stages of n = (depth - 2) / 6 basic blocks at strides 1/2/2, global average pooling, a linear
head. Widths 16/16/32/64; the "x4" nets of Tian et al., "Contrastive Representation
Distillation", ICLR 2020, use 32/64/128/256 (methods.md §0.3).

Parameter names and shapes equal those of HobbitLong/RepDistiller ``models/resnet.py`` (``conv1``,
``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``), so CRD's
released CIFAR teacher checkpoints load with ``strict=True``.

Stage maps: ``feats = [stem, layer1, layer2, layer3]``, each after its ReLU; with ``preact`` the
three stage maps are the last block's residual sum before that ReLU (the stem stays post-ReLU, as
in the CRD code), so ``relu(preact map) == map``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import global_pool, he_init, run_stage
from pipeline.types import FeatureRequest, ModelOutput


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an identity or 1x1 conv-BN shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output after the final ReLU, the residual sum before it)."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        pre = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pair(x)[0]


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(Net):
    """ResNet-``depth`` for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3)."""

    native_size = 32
    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet: depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _stage(widths[0], widths[1], n, 1)
        self.layer2 = _stage(widths[1], widths[2], n, 2)
        self.layer3 = _stage(widths[2], widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.embedding_dim = widths[3]
        he_init(self)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (stored as ``fc``, RepDistiller's name; replace ``fc``)."""
        return self.fc

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """Stage 1-3: the last block's ``bn2`` (its output plus the shortcut is the pre-ReLU
        map; OFD's ``get_bn_before_relu``)."""
        if index not in (1, 2, 3):
            return None
        return getattr(self, f"layer{index}")[-1].bn2

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        maps = [x] if feats else None
        for stage in (self.layer1, self.layer2, self.layer3):
            x, pre = run_stage(stage, x, feats and preact)
            if maps is not None:
                maps.append(pre if preact else x)
        embedding = global_pool(x)
        return ModelOutput(self.fc(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("resnet8")
def resnet8(num_classes: int) -> CifarResNet:
    return CifarResNet(8, num_classes=num_classes)


@MODELS.register("resnet14")
def resnet14(num_classes: int) -> CifarResNet:
    return CifarResNet(14, num_classes=num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes)


@MODELS.register("resnet32")
def resnet32(num_classes: int) -> CifarResNet:
    return CifarResNet(32, num_classes=num_classes)


@MODELS.register("resnet44")
def resnet44(num_classes: int) -> CifarResNet:
    return CifarResNet(44, num_classes=num_classes)


@MODELS.register("resnet56")
def resnet56(num_classes: int) -> CifarResNet:
    return CifarResNet(56, num_classes=num_classes)


@MODELS.register("resnet110")
def resnet110(num_classes: int) -> CifarResNet:
    return CifarResNet(110, num_classes=num_classes)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes)
