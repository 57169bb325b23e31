"""CIFAR ShuffleNet V2 (size 1x) of the CRD model zoo (``shufflev2``).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018,
Table 5 (1x: stages 116/232/464, 1024-channel last conv), in the CIFAR form of Tian et al.,
"Contrastive Representation Distillation", ICLR 2020 (methods.md §0.3): a 1x1 stem to 24
channels (no stride, no max-pool), stages each opened by a downsampling unit and followed by
3/7/3 basic units (channel split, half through 1x1-dw3x3-1x1, concat, shuffle), a 1x1 conv to
1024, global pooling: a 1024-d embedding.

Parameter names and shapes equal HobbitLong/RepDistiller ``models/ShuffleNetv2.py`` (``conv1``,
``bn1``, ``layer{1,2,3}.0.{conv1..conv5,bn1..bn5}``, ``layer{1,2,3}.{i>0}.{conv1..3,bn1..3}``,
``conv2``, ``bn2``, ``linear``).

Stage maps: ``feats = [stem, layer1, layer2, layer3]`` (after the last unit's shuffle). With
``preact`` a stage map is the last unit's output with its branch taken before the final ReLU,
shuffled like the output, so ``relu(preact map) == map``. (The CRD code returns that tensor
unshuffled, i.e. with the channels in a different order from the post-ReLU map.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import channel_shuffle, global_pool, run_stage
from pipeline.types import FeatureRequest, ModelOutput


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1,
             depthwise: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=cin if depthwise else 1,
                     bias=False)


class BasicUnit(nn.Module):
    """Split the channels in halves; the second half goes through 1x1-BN-ReLU, depthwise
    3x3-BN, 1x1-BN-ReLU; concatenate with the first half and shuffle (2 groups)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.half = half
        self.conv1 = _conv(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _conv(half, half, 3, 1, depthwise=True)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, the output with the branch's last ReLU left out)."""
        x1, x2 = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        post = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return post, channel_shuffle(torch.cat([x1, pre], 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: left dw3x3-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU;
    concatenate (each half ``cout / 2``) and shuffle."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = _conv(cin, cin, 3, 2, depthwise=True)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = _conv(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv(cin, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, 2, depthwise=True)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(Net):
    """ShuffleNet V2 for 32x32 inputs: ``widths`` = 3 stage widths + last conv width."""

    native_size = 32

    def __init__(self, widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 blocks: tuple[int, int, int] = (3, 7, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        stages = []
        for width, n in zip(widths[:3], blocks, strict=True):
            units = [DownUnit(cin, width)] + [BasicUnit(width) for _ in range(n)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(cin, widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.embedding_dim = widths[3]

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
        embedding = global_pool(F.relu(self.bn2(self.conv2(x))))
        return ModelOutput(self.linear(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("shufflev2")
def shufflev2(num_classes: int) -> CifarShuffleNetV2:
    return CifarShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)


MODELS.register("ShuffleV2")(shufflev2)  # CRD's name for it
