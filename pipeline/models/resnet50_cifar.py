"""CRD's CIFAR "ResNet50": the ImageNet bottleneck ResNet-50 with a CIFAR stem.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1 (bottleneck blocks
[3, 4, 6, 3], widths 64/128/256/512 with expansion 4), with the stem replaced by a 3x3 stride-1
conv and no max-pool, as used for CIFAR-100 by Tian et al., "Contrastive Representation
Distillation", ICLR 2020 (methods.md §0.3). The embedding is 2048-d.

Parameter names and shapes equal HobbitLong/RepDistiller ``models/resnetv2.py`` (``conv1``,
``bn1``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,shortcut.0,shortcut.1}``, ``linear``),
so CRD's ``ResNet50`` teacher checkpoint loads with ``strict=True``.

Stage maps: ``feats = [stem, layer1, layer2, layer3, layer4]`` after their ReLUs; with ``preact``
the four stage maps are the last block's residual sum before its ReLU (the stem stays post-ReLU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import global_pool, he_init, run_stage
from pipeline.types import FeatureRequest, ModelOutput


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, each with BN; shortcut; ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # an empty Sequential is the identity, and keeps RepDistiller's module layout
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output after the final ReLU, the residual sum before it)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pair(x)[0]


class CifarBottleneckResNet(Net):
    """Bottleneck ResNet with a 3x3 stride-1 stem; ``blocks`` per stage, e.g. (3, 4, 6, 3)."""

    native_size = 32

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(Bottleneck(cin, planes, stride if j == 0 else 1))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)
        self.embedding_dim = cin
        he_init(self)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (stored as ``linear``, RepDistiller's name; replace that)."""
        return self.linear

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """Stage 1-4: the last block's ``bn3`` (plus the shortcut: the pre-ReLU map)."""
        if index not in (1, 2, 3, 4):
            return None
        return getattr(self, f"layer{index}")[-1].bn3

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        maps = [x] if feats else None
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, pre = run_stage(stage, x, feats and preact)
            if maps is not None:
                maps.append(pre if preact else x)
        embedding = global_pool(x)
        return ModelOutput(self.linear(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("resnet50_cifar")
def resnet50_cifar(num_classes: int) -> CifarBottleneckResNet:
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)


MODELS.register("ResNet50")(resnet50_cifar)  # CRD's name for it
