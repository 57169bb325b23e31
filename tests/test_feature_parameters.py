"""``feature_parameters``: every parameter of a network except its classifier's (AB's init)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import MODELS, build_model
from pipeline.models.base import feature_parameters

ALIASES = {"ResNet50", "mobile_half", "MobileNetV2", "ShuffleV1", "ShuffleV2"}


def _check(net: nn.Module) -> None:
    feats = feature_parameters(net)
    head = list(net.classifier.parameters())
    ids = {id(p) for p in feats}
    assert head and not ids & {id(p) for p in head}
    assert len(feats) + len(head) == len(list(net.parameters()))
    assert ids | {id(p) for p in head} == {id(p) for p in net.parameters()}
    # the head is the last linear layer: its weight maps the embedding to the logits
    weight = next(p for p in head if p.ndim == 2)
    assert weight.shape[1] == net.embedding_dim


@pytest.mark.parametrize("arch", sorted(set(MODELS.names()) - ALIASES))
def test_feature_parameters_are_all_but_the_classifier(arch: str) -> None:
    _check(build_model(arch, 7))


def test_feature_parameters_of_a_timm_net() -> None:
    pytest.importorskip("timm")
    _check(build_model("timm:resnet10t", 7))


def test_stage_maps_depend_on_feature_parameters_only() -> None:
    net = build_model("resnet8", 7)
    out = net(torch.randn(2, 3, 32, 32), feats=(1, 2, 3))
    sum(m.sum() for m in out.feats.values()).backward()
    assert all(p.grad is None for p in net.classifier.parameters())
    assert all(p.grad is not None for p in feature_parameters(net))


def test_a_network_without_a_classifier_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a `classifier` module"):
        feature_parameters(nn.Sequential(nn.Linear(2, 2)))
