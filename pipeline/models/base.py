"""The model contract: every network returns a ``ModelOutput``.

``forward(x, feats=False, preact=False)``: logits, the pooled penultimate embedding, and the
stage maps asked for by ``feats`` (False: none; True: every stage; a tuple of stage indices:
those), post-activation, or pre-activation when ``preact`` is true, as ``{stage index: map}``.
Stage 0 is the stem, then one entry per stage (each network file says which tensors).
``embedding_dim`` is the size of the embedding; ``native_size`` the input resolution the network
was designed for; ``stage_info(size)`` describes every stage map at an input size before
training (``pipeline.models.features``); ``preact_bn(index)`` the BatchNorm right before stage
``index``'s final ReLU (OFD's margin comes from its statistics), None where the stage has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from pipeline.config.timm_names import timm_problem
from pipeline.registry import Registry
from pipeline.types import FeatureRequest, ModelOutput, StageInfo

MODELS: Registry[Callable[..., Net]] = Registry("model")
TIMM_PREFIX = "timm:"  # model.arch: timm:<name> → timm.create_model(<name>, pretrained=False)


class Net(nn.Module):
    embedding_dim: int
    native_size: int = 32
    # Names of the stage maps, stem first (``StageInfo.name``); "stage<i>" where not given.
    stage_names: tuple[str, ...] = ()

    def forward(  # type: ignore[override]
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        raise NotImplementedError

    def stage_info(self, image_size: int | None = None) -> tuple[StageInfo, ...]:
        """Every stage map at ``image_size`` (default ``native_size``), from one probe forward."""
        from pipeline.models.features import probe_feature_info

        return probe_feature_info(self, image_size or self.native_size)

    def preact_bn(self, index: int) -> nn.BatchNorm2d | None:
        """The BN whose output (plus a shortcut, in residual blocks) the ReLU ending stage
        ``index`` receives; None where there is none (the default, and always for the stem)."""
        return None


def pick_stages(maps: Sequence[Tensor] | None, feats: FeatureRequest) -> dict[int, Tensor] | None:
    """The maps ``feats`` asks for, keyed by stage index (see the module docstring)."""
    if maps is None or feats is False:
        return None
    if feats is True:
        return dict(enumerate(maps))
    missing = [i for i in feats if not 0 <= i < len(maps)]
    if missing:
        raise IndexError(
            f"stage maps: expected stage indices in 0..{len(maps) - 1}, found {missing}")
    return {i: maps[i] for i in feats}


def feature_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``net`` except its classifier's (``net.classifier``, which every
    ``Net`` has, timm networks included): the stem, the stages and anything between the last
    stage and the head, in ``net.parameters()`` order.

    These are what RepDistiller's ``get_feat_modules()`` lists for the AB init stage, with two
    differences found generically: a module after the last stage (WRN's final BN, MobileNetV2's
    1×1 ``conv2``) is included here; RepDistiller leaves those out.
    """
    head = getattr(net, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(net).__name__}: expected a `classifier` module (the final "
                         "linear layer) to tell the feature parameters from the head, found none")
    head_ids = {id(p) for p in head.parameters()}
    return [p for p in net.parameters() if id(p) not in head_ids]


def build_model(arch: str, num_classes: int) -> Net:
    """Build a network by name: a registered one (``resnet20``, ``wrn_40_2``, ``resnet18`` ...)
    or ``timm:<name>`` (``pipeline.models.timm_nets``)."""
    if arch.startswith(TIMM_PREFIX):
        from pipeline.models.timm_nets import build_timm

        return build_timm(arch[len(TIMM_PREFIX):], num_classes)
    import pipeline.models  # noqa: F401  (fills the registry)

    if arch.startswith("timm:") and (problem := timm_problem(arch)):
        raise ValueError(f"model.arch / teacher.arch: {problem}")
    return MODELS.get(arch)(num_classes=num_classes)
