"""CIFAR ShuffleNet V1 of the CRD model zoo (``shufflev1``: groups 3, stages 240/480/960).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018, Table 1 (g = 3), in the CIFAR form of Tian et al., "Contrastive
Representation Distillation", ICLR 2020 (methods.md §0.3): a 1x1 stem to 24 channels (no
stride, no max-pool), stages of 4/8/4 bottleneck units, each stage opened by a stride-2 unit whose
shortcut is a 3x3 average pool concatenated to the branch, global pooling: a 960-d embedding.
As in the CRD code the depthwise conv is followed by a ReLU, and the first unit's 1x1 conv on
the 24-channel stem is not grouped.

Parameter names and shapes equal HobbitLong/RepDistiller ``models/ShuffleNetv1.py``
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``linear``).

Stage maps: ``feats = [stem, layer1, layer2, layer3]`` after their ReLUs; with ``preact`` the
stage maps are the last unit's sum before its ReLU (the stem stays post-ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import channel_shuffle, global_pool, run_stage
from pipeline.types import FeatureRequest, ModelOutput


class ShuffleUnit(nn.Module):
    """Grouped 1x1, channel shuffle, 3x3 depthwise (carrying the stride), grouped 1x1; added to
    the input, or concatenated with its 3x3 average pool when ``stride`` is 2."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        self.stride = stride
        self.first_groups = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output after the final ReLU, the sum or concatenation before it)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pair(x)[0]


class CifarShuffleNetV1(Net):
    """ShuffleNet V1 for 32x32 inputs: ``widths`` and ``blocks`` per stage, ``groups``."""

    native_size = 32

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960),
                 blocks: tuple[int, int, int] = (4, 8, 4), groups: int = 3,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        stages = []
        for width, n in zip(widths, blocks, strict=True):
            # the stride-2 unit's branch makes width - cin channels; the pooled input adds cin
            units = [ShuffleUnit(cin, width - cin, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(cin, num_classes)
        self.embedding_dim = cin

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (stored as ``linear``, RepDistiller's name; replace that)."""
        return self.linear

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
        return ModelOutput(self.linear(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("shufflev1")
def shufflev1(num_classes: int) -> CifarShuffleNetV1:
    return CifarShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


MODELS.register("ShuffleV1")(shufflev1)  # CRD's name for it
