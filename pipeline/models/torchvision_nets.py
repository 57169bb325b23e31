"""ImageNet nets from torchvision behind the ``Net`` contract: resnet18/34/50, mobilenet_v2.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 and Sandler et al.,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, as built by
``torchvision.models`` (with ``weights=None``). The wrapper adopts torchvision's submodules under
their own names, so its state dict is exactly torchvision's and torchvision's released weights
(``torchvision:IMAGENET1K_V1``, see ``pipeline.models.weights``) load with ``strict=True``.

Forward walks torchvision's modules in torchvision's order (no forward hooks needed):
- ResNets: ``feats = [stem, layer1, layer2, layer3, layer4]``, the stem taken after its ReLU and
  before the max-pool (as mdistiller's ImageNet ResNets do). With ``preact`` each stage map is
  its last block's residual sum before the final ReLU, computed by running that block's own
  submodules (its forward applies the ReLU in place, so the sum cannot be hooked); the stem stays
  post-ReLU. The embedding is the pooled, flattened input of ``fc``.
- MobileNetV2: the stage maps are taken at the same points as CRD's CIFAR ``mobile_half``: the
  stem (``features[0]``) and the ends of the 24-, 32-, 96- and 320-channel groups
  (``features[3]``, ``[6]``, ``[13]``, ``[17]``). Those end in a linear bottleneck (no ReLU), so
  ``preact`` changes nothing. The embedding is the pooled 1280-d vector before the dropout;
  ``classifier`` is torchvision's (Dropout, Linear) as a ``LinearHead`` (reads like the Linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.models.base import MODELS, Net, pick_stages
from pipeline.models.zoo_utils import LinearHead
from pipeline.types import FeatureRequest, ModelOutput


def _adopt_children(wrapper: nn.Module, model: nn.Module) -> None:
    for name, child in model.named_children():
        wrapper.add_module(name, child)


def _block_pair(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A torchvision residual block's (output, residual sum before its last ReLU)."""
    if isinstance(block, BasicBlock):
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    elif isinstance(block, Bottleneck):
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        raise NotImplementedError(
            f"pre-activation maps: expected a torchvision BasicBlock or Bottleneck, "
            f"found {type(block).__name__}")
    pre = out + (x if block.downsample is None else block.downsample(x))
    return F.relu(pre), pre


class TorchvisionResNet(Net):
    """A torchvision ResNet (``arch`` = resnet18, resnet34, resnet50, ...) as a ``Net``."""

    native_size = 224
    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, arch: str, num_classes: int = 1000) -> None:
        super().__init__()
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        _adopt_children(self, model)
        self.tv_arch = arch
        self.embedding_dim = model.fc.in_features

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (stored as ``fc``, torchvision's name; replace ``fc``)."""
        return self.fc

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """Stage 1-4: the last block's ``bn2`` (BasicBlock) or ``bn3`` (Bottleneck), as OFD's
        ImageNet ``get_bn_before_relu``."""
        if index not in (1, 2, 3, 4):
            return None
        last = getattr(self, f"layer{index}")[-1]
        return last.bn3 if isinstance(last, Bottleneck) else last.bn2

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        x = self.relu(self.bn1(self.conv1(x)))
        maps = [x] if feats else None
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if feats and preact:
                *head, last = list(stage)
                for block in head:
                    x = block(x)
                x, pre = _block_pair(last, x)
                maps.append(pre)
            else:
                x = stage(x)
                if maps is not None:
                    maps.append(x)
        embedding = torch.flatten(self.avgpool(x), 1)
        return ModelOutput(self.fc(embedding), embedding, pick_stages(maps, feats))


class TorchvisionMobileNetV2(Net):
    """torchvision's MobileNetV2 (width 1.0) as a ``Net``."""

    native_size = 224
    stage_ends = (0, 3, 6, 13, 17)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        model = torchvision.models.get_model("mobilenet_v2", weights=None,
                                             num_classes=num_classes)
        self.features = model.features
        # torchvision's (Dropout, Linear) under the same name, so keys stay ``classifier.1.*``
        self.classifier = LinearHead(*model.classifier)
        self.tv_arch = "mobilenet_v2"
        self.embedding_dim = self.classifier.in_features

    def forward(
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        maps: list[Tensor] | None = [] if feats else None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if maps is not None and i in self.stage_ends:
                maps.append(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return ModelOutput(self.classifier(embedding), embedding, pick_stages(maps, feats))


@MODELS.register("resnet18")
def resnet18(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet("resnet18", num_classes)


@MODELS.register("resnet34")
def resnet34(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet("resnet34", num_classes)


@MODELS.register("resnet50")
def resnet50(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", num_classes)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(num_classes)
