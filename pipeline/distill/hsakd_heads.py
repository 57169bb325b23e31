"""HSAKD's auxiliary heads: after each stage, a copy of the network's remaining stages.

Yang, Xu, An & Xu, IJCAI 2021 (baselines.md §18; winycg/HSAKD ``models/resnet.py``,
``models/wrn.py#L128-188``, ``models/resnet_imagenet.py#L214-305``). For a network with stages
1..S (widths w_1..w_S, n blocks each), head i reads stage i's output and runs fresh copies of
stages i+1..S (same block type, block count and stride 2), or, for the last stage, one extra
stage at the last width with stride 1; then global average pooling and a linear layer to
``outputs`` (4·C joint classes) logits. Heads are built from the network's own structure:

- CIFAR ResNets (``CifarResNet``: resnet8..110, resnet8x4/32x4): post-activation basic blocks;
- Wide ResNets (``WideResNet``): pre-activation blocks, each head ending in BN-ReLU before the
  pool, as the network itself;
- torchvision ResNets (``TorchvisionResNet``: resnet18/34/50): copies of ``layer{i+1..4}``
  (``BasicBlock`` or ``Bottleneck``) made by torchvision's own ``_make_layer``.

Init: He-normal convs, BN γ = 1 and β = 0, linear bias 0 (HSAKD's). Any other network is
refused with the list of the supported ones.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from pipeline.models.base import build_model
from pipeline.models.cifar_resnet import CifarResNet, _stage
from pipeline.models.torchvision_nets import TorchvisionResNet
from pipeline.models.wrn import WideResNet, WideStage
from pipeline.models.zoo_utils import global_pool, he_init

SUPPORTED = ("CIFAR ResNets (resnet8..resnet110, resnet8x4, resnet32x4)",
             "Wide ResNets (wrn_16_1 ... wrn_40_4)", "torchvision ResNets (resnet18/34/50)")


class AuxHead(nn.Module):
    """Stages (a Sequential), an optional final BN-ReLU (pre-activation nets), pool, linear."""

    def __init__(self, stages: nn.Sequential, width: int, outputs: int,
                 final_bn: bool) -> None:
        super().__init__()
        self.stages = stages
        self.bn = nn.BatchNorm2d(width) if final_bn else None
        self.fc = nn.Linear(width, outputs)
        he_init(self, zero_linear_bias=True)  # He-normal convs, BN 1/0, FC bias 0

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(x)
        if self.bn is not None:
            x = nn.functional.relu(self.bn(x))
        return self.fc(global_pool(x))


def _plan(widths: list[int]) -> list[list[tuple[int, int, int]]]:
    """(cin, cout, stride) of the stages of each head (module docstring)."""
    s = len(widths)
    heads = []
    for i in range(s - 1):
        heads.append([(widths[j - 1], widths[j], 2) for j in range(i + 1, s)])
    heads.append([(widths[-1], widths[-1], 1)])
    return heads


def _cifar_resnet(net: CifarResNet, outputs: int) -> list[AuxHead]:
    n = len(net.layer1)
    widths = [net.layer1[0].conv1.out_channels, net.layer2[0].conv1.out_channels,
              net.layer3[0].conv1.out_channels]
    return [AuxHead(nn.Sequential(*[_stage(a, b, n, st) for a, b, st in head]), widths[-1],
                    outputs, final_bn=False) for head in _plan(widths)]


def _wrn(net: WideResNet, outputs: int) -> list[AuxHead]:
    n = len(net.block1.layer)
    widths = [b.layer[0].conv1.out_channels for b in (net.block1, net.block2, net.block3)]
    return [AuxHead(nn.Sequential(*[WideStage(n, a, b, st) for a, b, st in head]), widths[-1],
                    outputs, final_bn=True) for head in _plan(widths)]


def _torchvision_resnet(net: TorchvisionResNet, outputs: int) -> list[AuxHead]:
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    block = type(layers[0][0])
    counts = [len(layer) for layer in layers]
    planes = [64, 128, 256, 512]
    maker = torchvision.models.ResNet(block, counts)  # for its _make_layer (inplanes state)
    heads = []
    for head in _plan(planes):
        stages = []
        for cin, cout, stride in head:
            maker.inplanes = cin * block.expansion
            j = planes.index(cout) if stride == 2 else 3
            stages.append(maker._make_layer(block, cout, counts[j], stride=stride))
        heads.append(AuxHead(nn.Sequential(*stages), planes[-1] * block.expansion, outputs,
                             final_bn=False))
    del maker
    return heads


def aux_heads(arch: str, num_classes: int, outputs: int) -> nn.ModuleList:
    """The HSAKD heads of network ``arch`` (built for ``num_classes`` to read its structure),
    one per stage after the stem, each with ``outputs`` logits; ValueError for another arch."""
    net = build_model(arch, num_classes)
    if isinstance(net, CifarResNet):
        heads = _cifar_resnet(net, outputs)
    elif isinstance(net, WideResNet):
        heads = _wrn(net, outputs)
    elif isinstance(net, TorchvisionResNet):
        heads = _torchvision_resnet(net, outputs)
    else:
        raise ValueError(f"hsakd: auxiliary heads replicate the network's later stages; "
                         f"{arch!r} ({type(net).__name__}) is not supported, only "
                         f"{'; '.join(SUPPORTED)}")
    return nn.ModuleList(heads)
