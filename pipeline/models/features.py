"""What stage maps a network returns, known before training: one probe forward per input size.

Feature methods build their connectors and regressors from these shapes when they are
constructed (the optimiser and DDP exist before the first batch, so nothing may be created
lazily), the cache writer sizes its arrays from them, and ``resolve_stages`` turns a method's
stage selection ("every stage after the stem", "the last one", "stage 2") into indices.

The probe runs the network in eval mode under ``no_grad`` on a fixed random batch of two, once
with post- and once with pre-activation maps, and restores the training mode: BatchNorm running
statistics are not touched. A stage ``has_preact`` when its two maps differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.types import StageInfo

ALL_STAGES = "all"  # a stage selection: every stage after the stem
StageSelection = Sequence[int | str]


def stage_name(net: nn.Module, index: int) -> str:
    names = getattr(net, "stage_names", ())
    if index < len(names):
        return names[index]
    return "stem" if index == 0 else f"stage{index}"


@torch.no_grad()
def probe_feature_info(net: nn.Module, image_size: int) -> tuple[StageInfo, ...]:
    """Every stage map of ``net`` for square inputs of ``image_size`` pixels."""
    cache = net.__dict__.setdefault("_feature_info_cache", {})
    if image_size in cache:
        return cache[image_size]
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, image_size, image_size, generator=generator).to(device)
    was_training = net.training
    net.eval()
    try:
        post = net(x, feats=True).feats or {}
        pre = net(x, feats=True, preact=True).feats if getattr(net, "offers_preact", True) else post
    finally:
        net.train(was_training)
    info = tuple(
        StageInfo(
            index=i,
            name=stage_name(net, i),
            channels=int(m.shape[1]),
            height=int(m.shape[2]),
            width=int(m.shape[3]),
            stride=max(1, round(image_size / int(m.shape[2]))),
            has_preact=not torch.equal(m, (pre or {}).get(i, m)),
        )
        for i, m in sorted(post.items())
    )
    cache[image_size] = info
    return info


def resolve_stages(selection: StageSelection, num_stages: int, who: str = "") -> tuple[int, ...]:
    """Stage indices of a selection: ints (negative count from the end) and ``"all"`` (every
    stage after the stem), de-duplicated, in the order first named."""
    out: list[int] = []
    for item in selection:
        if item == ALL_STAGES:
            picked = list(range(1, num_stages))
        elif isinstance(item, int) and not isinstance(item, bool):
            index = item + num_stages if item < 0 else item
            if not 0 <= index < num_stages:
                raise ValueError(
                    f"{who or 'stage selection'}: stage {item} does not exist; the network has "
                    f"{num_stages} stage maps (0 = the stem .. {num_stages - 1}, or -1 .. "
                    f"-{num_stages})")
            picked = [index]
        else:
            raise ValueError(
                f"{who or 'stage selection'}: expected stage indices or {ALL_STAGES!r}, found "
                f"{item!r}")
        out += [i for i in picked if i not in out]
    return tuple(out)
