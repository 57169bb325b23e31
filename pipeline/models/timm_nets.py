"""timm networks behind the ``Net`` contract: ``model.arch: timm:<name>`` (optional dependency).

``build_timm(name, num_classes)`` calls ``timm.create_model(name, pretrained=False,
num_classes=num_classes)`` (no download: weights come from ``model.weights`` like any other net)
and gives the model our ``forward(x, feats, preact)``. The model keeps its own class as a base
(a subclass is made per timm class), so its state dict is exactly timm's and timm checkpoints
load strictly.

Forward uses timm's feature-extraction API:
- ``forward_intermediates(x, indices)`` returns the final map and the stage maps; stage ``i``
  of ours is timm's ``feature_info[i]`` (for ResNets: the stem ``act1``, then ``layer1`` ..
  ``layer4``; ConvNeXt has no stem entry, so its stage 0 is its first stage). ``feature_info``
  is timm's own attribute (a list of dicts), which is why every ``Net`` describes its stages
  with ``stage_info()``;
- the embedding is ``forward_head(final, pre_logits=True)`` (pooling and any head norm), the
  logits ``get_classifier()(embedding)``. With timm's default ``drop_rate=0`` this equals timm's
  own ``forward``; a non-zero head dropout is skipped (our nets have none).
timm exposes post-activation maps only: ``preact=True`` is refused (``offers_preact`` is False).
"""

from __future__ import annotations

from functools import cache

from torch import Tensor, nn

from pipeline.models.base import TIMM_PREFIX, Net
from pipeline.models.features import probe_feature_info
from pipeline.types import FeatureRequest, ModelOutput, StageInfo


class TimmNet:
    """The ``Net`` interface mixed into a timm model's class (see the module docstring)."""

    offers_preact = False
    timm_name: str

    @property
    def embedding_dim(self) -> int:
        return int(getattr(self, "head_hidden_size", None) or self.num_features)

    @property
    def native_size(self) -> int:
        return int(self.pretrained_cfg.get("input_size", (3, 224, 224))[-1])

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(str(f["module"]) for f in self.feature_info)

    @property
    def classifier(self) -> nn.Module:
        return self.get_classifier()

    def forward(  # type: ignore[override]
        self, x: Tensor, feats: FeatureRequest = False, preact: bool = False
    ) -> ModelOutput:
        if feats is not False and preact:
            raise ValueError(
                f"{TIMM_PREFIX}{self.timm_name}: timm networks expose post-activation stage "
                "maps only; use a method that reads post-activation maps (preact: false)")
        if feats is False or feats == ():
            final = self.forward_features(x)
            maps = None
        else:
            indices = list(range(len(self.feature_info))) if feats is True else list(feats)
            final, found = self.forward_intermediates(x, indices=indices)
            maps = dict(zip(indices, found, strict=True))
        embedding = self.forward_head(final, pre_logits=True)
        return ModelOutput(self.get_classifier()(embedding), embedding, maps)

    def stage_info(self, image_size: int | None = None) -> tuple[StageInfo, ...]:
        return probe_feature_info(self, image_size or self.native_size)  # type: ignore[arg-type]


@cache
def _net_class(timm_class: type) -> type:
    return type(f"Timm{timm_class.__name__}", (TimmNet, timm_class), {})


def build_timm(name: str, num_classes: int) -> Net:
    """A timm model as a ``Net`` (raises ``ValueError`` naming the model when timm lacks it)."""
    try:
        import timm
    except ImportError as err:
        raise ValueError(
            f"model.arch {TIMM_PREFIX}{name}: timm is not installed (make setup installs it; "
            "pip install timm==1.0.31)") from err
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:8] if len(name) >= 4 else []
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"model.arch {TIMM_PREFIX}{name}: timm has no model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"model.arch {TIMM_PREFIX}{name}: this timm model has no forward_intermediates, "
            "which the stage maps come from; pick another model")
    model.__class__ = _net_class(type(model))
    model.timm_name = name
    return model  # type: ignore[return-value]
