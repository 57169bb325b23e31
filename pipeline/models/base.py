"""The model contract: every network returns a ``ModelOutput``.

``forward(x, feats=False, preact=False)``: logits, the pooled penultimate embedding, and, only
when ``feats`` is true, the list of stage feature maps (post-activation, or pre-activation when
``preact`` is true). ``embedding_dim`` is the size of the embedding; ``native_size`` the input
resolution the network was designed for.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pipeline.config.timm_names import timm_problem
from pipeline.registry import Registry
from pipeline.types import ModelOutput

MODELS: Registry[Callable[..., Net]] = Registry("model")


class Net(nn.Module):
    embedding_dim: int
    native_size: int = 32

    def forward(self, x: Tensor, feats: bool = False, preact: bool = False) -> ModelOutput:  # type: ignore[override]
        raise NotImplementedError


def build_model(arch: str, num_classes: int) -> Net:
    """Build a registered network by name (``resnet20``, ``wrn_40_2``, ``resnet18`` ...)."""
    import pipeline.models  # noqa: F401  (fills the registry)

    if arch.startswith("timm:") and (problem := timm_problem(arch)):
        raise ValueError(f"model.arch / teacher.arch: {problem}")
    return MODELS.get(arch)(num_classes=num_classes)
