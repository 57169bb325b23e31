"""The augmentation plan: a pure, reproducible function of (seed, index, view) that draws
random-resized crops from the same distribution as torchvision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data.plan import AugPlan, Crop, view_for_epoch

REPO = Path(__file__).resolve().parents[1]
P_MIN = 1e-3  # both samples come from fixed seeds, so these tests cannot flake


def test_from_spec_kinds() -> None:
    cifar = AugPlan.from_spec(DataSpec(augment="cifar"), seed=3)
    assert (cifar.kind, cifar.size, cifar.padding, cifar.flip, cifar.seed) == (
        "pad_crop",
        32,
        4,
        True,
        3,
    )
    tiny = AugPlan.from_spec(DataSpec(augment="tiny_imagenet"), seed=0)
    assert (tiny.kind, tiny.size, tiny.padding) == ("pad_crop", 64, 8)
    spec = DataSpec(augment="imagenet", image_size=224, rrc_scale=[0.35, 1.0], rrc_ratio=[0.5, 2])
    rrc = AugPlan.from_spec(spec, seed=0)
    assert (rrc.kind, rrc.size, rrc.scale, rrc.ratio) == ("rrc", 224, (0.35, 1.0), (0.5, 2.0))
    no_flip = AugPlan.from_spec(DataSpec(augment="cifar", flip=False), seed=3)
    assert not no_flip.flip and not any(no_flip.draw(i, 0, 32, 32).flip for i in range(50))
    assert no_flip.draw(7, 0, 32, 32)[:4] == cifar.draw(7, 0, 32, 32)[:4]  # same boxes
    none = AugPlan.from_spec(DataSpec(augment="none", image_size=48), seed=0)
    assert (none.kind, none.size, none.flip) == ("none", 48, False)
    assert none.draw(5, 0, 60, 40) == Crop(0, 0, 40, 60, False)
    assert AugPlan.from_dict(json.loads(json.dumps(rrc.to_dict()))) == rrc


def test_from_spec_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="rrc_scale"):
        AugPlan.from_spec(DataSpec(augment="imagenet", rrc_scale=[0.1]), seed=0)
    with pytest.raises(ConfigError, match="scale"):
        AugPlan.from_spec(DataSpec(augment="imagenet", rrc_scale=[0.5, 0.1]), seed=0)
    with pytest.raises(ConfigError, match="augment"):
        AugPlan.from_spec(DataSpec(augment="mixup"), seed=0)  # type: ignore[arg-type]


def test_view_for_epoch() -> None:
    assert [view_for_epoch(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [view_for_epoch(e, 0) for e in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        view_for_epoch(-1, 2)


def _draws(plan: AugPlan, n: int, view: int, w: int, h: int) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in plan.draw(i, view, w, h)) for i in range(n)]


def test_same_key_same_draw_in_this_and_another_process() -> None:
    plan = AugPlan("rrc", size=224, seed=1234)
    ours = _draws(plan, 50, 3, 500, 375)
    assert ours == _draws(plan, 50, 3, 500, 375)
    # Out of order and one by one: no hidden state.
    assert [tuple(int(v) for v in plan.draw(i, 3, 500, 375)) for i in reversed(range(50))] == (
        ours[::-1]
    )
    code = (
        "import json; from pipeline.data.plan import AugPlan; "
        "p = AugPlan('rrc', size=224, seed=1234); "
        "print(json.dumps([[int(v) for v in p.draw(i, 3, 500, 375)] for i in range(50)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert [tuple(r) for r in json.loads(out.stdout)] == ours


def test_views_seeds_and_indices_differ() -> None:
    plan = AugPlan("rrc", size=224, seed=0)
    v0, v1 = _draws(plan, 100, 0, 500, 375), _draws(plan, 100, 1, 500, 375)
    assert sum(a != b for a, b in zip(v0, v1, strict=True)) > 95
    other_seed = _draws(AugPlan("rrc", size=224, seed=1), 100, 0, 500, 375)
    assert sum(a != b for a, b in zip(v0, other_seed, strict=True)) > 95
    assert len(set(v0)) > 95


def test_draw_many_matches_draw() -> None:
    plan = AugPlan("pad_crop", size=32, padding=4, seed=7)
    sizes = np.array([[32, 32]] * 20)
    many = plan.draw_many(np.arange(20), 2, sizes)
    assert many.shape == (20, 5)
    assert [tuple(r) for r in many.tolist()] == _draws(plan, 20, 2, 32, 32)


def test_pad_crop_offsets_uniform_and_flip_half() -> None:
    plan = AugPlan("pad_crop", size=32, padding=4, seed=11)
    draws = np.array(_draws(plan, 9000, 0, 32, 32))
    assert (draws[:, 2] == 32).all() and (draws[:, 3] == 32).all()
    for col in (0, 1):  # top, left
        counts = np.bincount(draws[:, col], minlength=9)
        assert len(counts) == 9 and counts.min() > 0  # exactly 0..2·padding
        assert stats.chisquare(counts).pvalue > P_MIN
    assert stats.binomtest(int(draws[:, 4].sum()), len(draws), 0.5).pvalue > P_MIN


def _torchvision_rrc(n: int, w: int, h: int, scale: tuple, ratio: tuple) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    rows = [T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    return np.array(rows)  # (top, left, height, width)


def _features(boxes: np.ndarray, w: int, h: int) -> dict[str, np.ndarray]:
    top, left, bh, bw = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return {
        "area": bh * bw / (w * h),
        "aspect": bw / bh,
        "top": top,
        "left": left,
        "height": bh,
    }


@pytest.mark.parametrize(
    ("w", "h", "scale", "ratio"),
    [
        (500, 375, (0.08, 1.0), (3 / 4, 4 / 3)),  # typical ImageNet photo
        (64, 200, (0.35, 1.0), (3 / 4, 4 / 3)),  # tall: many attempts fail, some fall back
        (120, 20, (0.08, 1.0), (3 / 4, 4 / 3)),  # wide strip: a mixture of fits and fallbacks
    ],
)
def test_rrc_matches_torchvision_distribution(w: int, h: int, scale: tuple, ratio: tuple) -> None:
    n = 3000
    plan = AugPlan("rrc", size=224, scale=scale, ratio=ratio, seed=5)
    ours = np.array(_draws(plan, n, 0, w, h))
    theirs = _torchvision_rrc(n, w, h, scale, ratio)
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    assert (ours[:, :2] >= 0).all() and (ours[:, 2:4] > 0).all()
    a, b = _features(ours[:, :4], w, h), _features(theirs, w, h)
    for name in a:
        assert stats.ks_2samp(a[name], b[name]).pvalue > P_MIN, name
    assert stats.binomtest(int(ours[:, 4].sum()), n, 0.5).pvalue > P_MIN


def test_rrc_degenerate_shape_uses_torchvision_fallback() -> None:
    # 1000×10: no attempt can fit, so every draw is the ratio-clamped centre crop.
    plan = AugPlan("rrc", size=224, seed=0)
    theirs = _torchvision_rrc(50, 1000, 10, plan.scale, plan.ratio)
    assert {tuple(r) for r in theirs.tolist()} == {(0, 493, 10, 13)}
    ours = {tuple(r[:4]) for r in _draws(plan, 50, 0, 1000, 10)}
    assert ours == {(0, 493, 10, 13)}
    # Tall and thin: width kept, height from the smallest ratio.
    theirs = {tuple(r) for r in _torchvision_rrc(20, 10, 1000, plan.scale, plan.ratio).tolist()}
    assert {tuple(r[:4]) for r in _draws(plan, 20, 0, 10, 1000)} == theirs
    # In range but a scale no attempt can meet (> whole image is impossible; use a tiny image).
    tiny = {tuple(r) for r in _torchvision_rrc(20, 1, 1, (0.08, 0.2), plan.ratio).tolist()}
    assert {tuple(r[:4]) for r in _draws(AugPlan("rrc", 8, scale=(0.08, 0.2)), 20, 0, 1, 1)} == tiny


def test_draw_rejects_bad_keys_and_sizes() -> None:
    plan = AugPlan("pad_crop", size=32, padding=4)
    with pytest.raises(ValueError, match="index"):
        plan.draw(-1, 0, 32, 32)
    with pytest.raises(ValueError, match="sample 3"):
        plan.draw(3, 0, 16, 16)  # too small for a 32 crop with padding 4
    with pytest.raises(ValueError, match="sample 4"):
        plan.draw(4, 0, 0, 10)
