"""CIFAR VGG nets with batch norm of the CRD model zoo: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, Table 1 (configurations A, B, D, E; "vgg8" is CRD's one-conv-per-group "S"), with BN
after every conv (Ioffe & Szegedy, ICML 2015) and the three FC layers replaced by global pooling
and one Linear(512, C), as in Tian et al., "Contrastive Representation Distillation", ICLR 2020
(methods.md §0.3). Five conv groups are separated by 2x2 max-pools; the pool after group 3 is
skipped for inputs of 32 px or less (the CRD code applies it only to 64 px inputs).

Parameter names and shapes equal HobbitLong/RepDistiller ``models/vgg.py`` with
``batch_norm=True``: ``block{0..4}.{j}`` hold conv (with bias), BN and ReLU modules in turn, the
ReLU after a group's last BN left out, so a group's last module is its last BN; ``classifier`` is
the Linear.

Stage maps: ``feats = [group0, group1, ..., group4]`` after their ReLUs; with ``preact`` groups
1-4 are taken before the ReLU, i.e. the last BN's output (group 0 stays post-ReLU, as in CRD).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import global_pool, he_init
from pipeline.types import FeatureRequest, ModelOutput

VGG_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _group(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU per width, without the final ReLU."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class CifarVGG(Net):
    """VGG with BN for small inputs; ``groups`` gives each group's conv widths."""

    native_size = 32

    def __init__(self, groups: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        if len(groups) != 5:
            raise ValueError(f"CifarVGG: expected 5 conv groups, got {len(groups)}: {groups}")
        cin = 3
        for i, widths in enumerate(groups):
            self.add_module(f"block{i}", _group(cin, widths))
            cin = widths[-1]
        self.classifier = nn.Linear(cin, num_classes)
        self.embedding_dim = cin
        he_init(self, linear_std=0.01)

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """Groups 1-4: the group's last BN, whose output is the pre-ReLU stage map."""
        if index not in (1, 2, 3, 4):
            return None
        return getattr(self, f"block{index}")[-1]

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        small = x.shape[-2] <= 32
        blocks = [self.block0, self.block1, self.block2, self.block3, self.block4]
        x = F.relu(blocks[0](x))
        maps = [x] if feats else None
        for i, block in enumerate(blocks[1:], start=1):
            if not (i == 4 and small):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            pre = block(x)
            x = F.relu(pre)
            if maps is not None:
                maps.append(pre if preact else x)
        embedding = global_pool(x)
        return ModelOutput(self.classifier(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("vgg8")
def vgg8(num_classes: int) -> CifarVGG:
    return CifarVGG(VGG_GROUPS["vgg8"], num_classes)


@MODELS.register("vgg11")
def vgg11(num_classes: int) -> CifarVGG:
    return CifarVGG(VGG_GROUPS["vgg11"], num_classes)


@MODELS.register("vgg13")
def vgg13(num_classes: int) -> CifarVGG:
    return CifarVGG(VGG_GROUPS["vgg13"], num_classes)


@MODELS.register("vgg16")
def vgg16(num_classes: int) -> CifarVGG:
    return CifarVGG(VGG_GROUPS["vgg16"], num_classes)


@MODELS.register("vgg19")
def vgg19(num_classes: int) -> CifarVGG:
    return CifarVGG(VGG_GROUPS["vgg19"], num_classes)
