"""The model zoo: importing this package registers every network in ``MODELS``.

CIFAR nets of the distillation papers under their CRD/RepDistiller names, with RepDistiller's
parameter names so its released teachers load strictly (methods.md §0.3): ``resnet8`` ...
``resnet110``, ``resnet8x4``, ``resnet32x4``, ``resnet50_cifar`` (alias ``ResNet50``),
``wrn_16_1`` ... ``wrn_40_4``, ``vgg8`` ... ``vgg19`` (with BN), ``mobilenetv2`` (aliases
``mobile_half``, ``MobileNetV2``), ``shufflev1`` / ``shufflev2`` (aliases ``ShuffleV1``,
``ShuffleV2``); and torchvision's ImageNet ``resnet18``, ``resnet34``, ``resnet50``,
``mobilenet_v2``. ``build_model(arch, num_classes)`` builds one; ``load_weights(model, source)``
loads a checkpoint or ``torchvision:<ENUM>`` weights into it.
"""

from pipeline.models import (  # noqa: F401  (each import registers its nets)
    cifar_resnet,
    mobilenetv2,
    resnet50_cifar,
    shufflenetv1,
    shufflenetv2,
    torchvision_nets,
    vgg,
    wrn,
)
from pipeline.models.base import MODELS, Net, build_model
from pipeline.models.weights import file_sha256, load_weights

__all__ = ["MODELS", "Net", "build_model", "file_sha256", "load_weights"]
