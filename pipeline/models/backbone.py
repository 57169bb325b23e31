"""Load a network's backbone from a checkpoint of another class count: the classifier is dropped.

Transfer (a CIFAR-100 student probed on STL-10's 10 or Tiny-ImageNet's 200 classes, CID
Table 5) builds the network with the *target's* class count and loads everything but the
classification head from the source checkpoint. Which keys form the head is found without
knowing the architecture: the parameters and buffers whose shapes change with the class count
(the net built for 2 and for 3 classes) — ``fc.weight``/``fc.bias`` of the CIFAR ResNets,
``classifier.*`` of VGG, ``head.fc.*`` of a timm net, any auxiliary per-class head. Those are
excluded from the source state; every other key must be present in both with the same shape
(an error lists what differs), and the non-strict load must report exactly the head keys as
missing and nothing unexpected. The head keeps its fresh initialisation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.models.base import build_model
from pipeline.models.weights import source_state, weights_info

PROBE_CLASS_COUNTS = (2, 3)  # two class counts whose shape differences reveal the head


def head_keys(arch: str) -> set[str]:
    """State-dict keys of ``arch`` whose shapes depend on the number of classes."""
    a, b = (build_model(arch, c).state_dict() for c in PROBE_CLASS_COUNTS)
    if a.keys() != b.keys():  # a net whose key set depends on the class count
        return (a.keys() ^ b.keys()) | {k for k in a.keys() & b.keys() if a[k].shape != b[k].shape}
    return {k for k in a if a[k].shape != b[k].shape}


def load_backbone(
    model: nn.Module, arch: str, source: str, trusted: bool = False
) -> dict[str, Any]:
    """Load every key of ``source`` but the classifier of ``arch`` into ``model``.

    Returns ``{"source", "path", "sha256", "loaded", "dropped", "fresh"}``: the number of
    tensors loaded, the head keys of the file that were left out, and the head keys of ``model``
    left at their initial values (both sorted). Raises ``ValueError`` when any
    non-head key is missing, unexpected or of another shape.
    """
    head = head_keys(arch)
    if not head:
        raise ValueError(f"weights: found no class-count-dependent keys in {arch!r}: cannot tell "
                         "its classifier from its backbone")
    state, path = source_state(model, source, trusted)
    backbone = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    wanted = own.keys() - head
    missing = sorted(wanted - backbone.keys())
    unexpected = sorted(backbone.keys() - wanted)
    reshaped = sorted(k for k in wanted & backbone.keys() if own[k].shape != backbone[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{n} {what}: {', '.join(keys[:5])}" for n, what, keys in (
            (len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
            (len(reshaped), "of another shape", reshaped)) if keys]
        raise ValueError(f"weights: the backbone of {path} does not fit {arch} (classifier keys "
                         f"{sorted(head)} excluded): " + "; ".join(parts))
    result = model.load_state_dict(backbone, strict=False)
    if set(result.missing_keys) != head & own.keys() or result.unexpected_keys:
        raise ValueError(f"weights: loading the backbone of {path} left {result.missing_keys} "
                         f"missing and {result.unexpected_keys} unexpected; expected exactly the "
                         f"classifier {sorted(head)} missing")
    return {**weights_info(source, path), "loaded": len(backbone),
            "dropped": sorted(head & state.keys()), "fresh": sorted(head & own.keys())}


__all__ = ["head_keys", "load_backbone"]
