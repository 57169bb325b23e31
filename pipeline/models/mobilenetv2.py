"""CIFAR MobileNetV2 of the CRD model zoo (``mobile_half``: expansion 6, width 0.5).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, Table 2,
in the CIFAR form used by Tian et al., "Contrastive Representation Distillation", ICLR 2020
(taken from Jin et al., "Knowledge Distillation via Route Constrained Optimization", ICCV 2019):
a 3x3 stride-2 stem to 16 channels, inverted-residual groups (t, c, n, s) = (1,16,1,1),
(6,24,2,1), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1) with c halved, a 1x1
conv to 1280 (not scaled down for width < 1), global pooling: a 1280-d embedding (methods.md
§0.3). Unlike torchvision, every block keeps its 1x1 expansion conv, even at t = 1.

Parameter names and shapes equal HobbitLong/RepDistiller ``models/mobilenetv2.py``: ``conv1.{0,1}``,
``blocks.{g}.{i}.conv.{0..7}``, ``conv2.{0,1}`` and ``classifier.0`` (a one-layer Sequential:
a ``LinearHead``, which reads like the Linear inside it).

Stage maps, at CRD's points: ``feats = [stem, after group 1, group 2, group 4, group 6]``. The
stage maps end in a linear bottleneck (BN, no ReLU), so ``preact`` changes nothing here.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import LinearHead, global_pool, he_init
from pipeline.types import FeatureRequest, ModelOutput

# (expansion t, channels c, repeats n, first stride s) per group, before the width multiplier
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
# groups after which CRD records a stage map (their feat[1..4])
STAGE_GROUPS = (1, 2, 4, 6)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN; identity added when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(Net):
    """MobileNetV2 for 32x32 inputs with expansion ``t`` for groups 2-7 and width ``width``."""

    native_size = 32

    def __init__(self, num_classes: int = 100, expansion: int = 6, width: float = 0.5) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        groups = []
        for t, c, n, s in SETTINGS:
            t = expansion if t != 1 else 1
            cout = int(c * width)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.classifier = LinearHead(nn.Linear(last, num_classes))
        self.embedding_dim = last
        he_init(self, linear_std=0.01)

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        x = self.conv1(x)
        maps = [x] if feats else None
        for g, group in enumerate(self.blocks):
            x = group(x)
            if maps is not None and g in STAGE_GROUPS:
                maps.append(x)
        embedding = global_pool(self.conv2(x))
        return ModelOutput(self.classifier(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, expansion=6, width=0.5)


MODELS.register("mobile_half")(mobilenetv2)  # CRD's function name
MODELS.register("MobileNetV2")(mobilenetv2)  # CRD's model_dict key
