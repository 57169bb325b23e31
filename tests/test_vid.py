"""VID: against torchdistill's VIDLoss given (μ, σ²) from its own Regressor4VID holding our
weights, pooling before the regressor, the initial variance, training of regressors and
variances; and FitNet + KD + VID from a teacher cache holding just their stages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config.errors import ConfigError
from pipeline.distill.base import METHODS
from pipeline.distill.vid import VID, VIDOptions, vid_nll
from tests.feature_helpers import context, outputs

td_losses = pytest.importorskip("torchdistill.losses.mid_level")
td_wrapper = pytest.importorskip("torchdistill.models.wrapper")


def _td_vid(method: VID, student_maps: list, teacher_maps: list) -> torch.Tensor:
    """torchdistill's VIDLoss, μ and σ² from Regressor4VID with our weights copied in."""
    pairs, s_io, t_io = {}, {}, {}
    for k, ((s, t), f_s, f_t) in enumerate(zip(method.pairs, student_maps, teacher_maps,
                                               strict=True)):
        ref = td_wrapper.Regressor4VID(s.channels, t.channels, t.channels, eps=1e-5,
                                       init_pred_var=5.0).double()
        ref.regressor.load_state_dict(method.regressors[k].state_dict())
        with torch.no_grad():
            ref.soft_plus_param.copy_(method.log_scales[k])
        pairs[f"p{k}"] = {"student": {"io": "output", "path": f"s{k}"},
                          "teacher": {"io": "output", "path": f"t{k}"}, "weight": 1}
        s_io[f"s{k}"] = {"output": ref(f_s)}
        t_io[f"t{k}"] = {"output": f_t}
    return td_losses.VIDLoss(pairs)(s_io, t_io)


def _method(ctx, **kw) -> VID:
    torch.manual_seed(0)
    method = VID(VIDOptions(**kw), ctx).double()
    with torch.no_grad():  # variances away from their common initial value
        for a in method.log_scales:
            a.add_(torch.randn_like(a))
    return method


def test_vid_equals_torchdistill_mismatched_channels_batch_of_two() -> None:
    ctx = context(student=[(4, 8), (6, 4), (8, 2)], teacher=[(5, 8), (9, 4), (12, 2)])
    method = _method(ctx)
    student, teacher, batch = outputs(ctx, batch=2)
    terms = method(student, teacher, batch)
    assert set(terms) == {"ce", "vid"}
    expected = _td_vid(method, [student.feats[k] for k in (1, 2, 3)],
                       [teacher.feats[k] for k in (1, 2, 3)])
    torch.testing.assert_close(terms["vid"], expected, rtol=1e-5, atol=1e-10)


def _block_mean(f: torch.Tensor, size: int) -> torch.Tensor:
    b, c, h, _ = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean(dim=(3, 5))


def test_mismatched_spatial_sizes_pool_before_the_regressor() -> None:
    ctx = context(student=[(4, 8), (6, 2)], teacher=[(5, 4), (9, 4)])
    method = _method(ctx, ce_weight=0.0, beta=0.5)
    student, teacher, batch = outputs(ctx, batch=2, seed=1)
    got = method(student, teacher, batch)
    assert set(got) == {"vid"}
    s_maps = [_block_mean(student.feats[1], 4), student.feats[2]]
    t_maps = [teacher.feats[1], _block_mean(teacher.feats[2], 2)]
    torch.testing.assert_close(got["vid"], 0.5 * _td_vid(method, s_maps, t_maps), rtol=1e-5,
                               atol=1e-10)


def test_modules_initial_variance_and_training() -> None:
    ctx = context(student=[(4, 8), (6, 4)], teacher=[(5, 8), (9, 4)])
    method = VID(VIDOptions(), ctx)
    convs = [m for m in method.regressors[1] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 9), (9, 9), (9, 9)]
    assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
    for var, (_, t) in zip(method.variances(), method.pairs, strict=True):
        assert var.shape == (t.channels,)
        torch.testing.assert_close(var, torch.full_like(var, 5.0), rtol=1e-6, atol=0)
    student, teacher, batch = outputs(ctx, batch=2, dtype=torch.float32)
    method(student, teacher, batch)["vid"].backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in method.log_scales)
    assert all(p.grad is not None for p in method.regressors.parameters())
    assert {k.split(".")[0] for k in method.state_dict()} == {"regressors", "log_scales"}


def test_nll_formula_and_requirements() -> None:
    mean, target = torch.tensor([[[[1.0]], [[2.0]]]]), torch.tensor([[[[0.0]], [[0.0]]]])
    var = torch.tensor([2.0, 4.0])
    by_hand = 0.5 * ((1 / 2 + math.log(2)) + (4 / 4 + math.log(4))) / 2
    torch.testing.assert_close(vid_nll(mean, var, target), torch.tensor(by_hand))
    needs = VID.requirements(VIDOptions(stages=[1, -1]))
    assert needs.teacher_stages == needs.student_stages == (1, -1) and needs.teacher_fields == ()
    parse = METHODS.get("vid").parse_options
    with pytest.raises(ConfigError, match=r"method: init_var, eps: expected init_var > eps > 0"):
        parse({"init_var": 0.0}, "method", "run.yaml")
    with pytest.raises(ConfigError, match=r"method.stages: expected at least one stage"):
        parse({"stages": []}, "method", "run.yaml")


CACHE_CONFIG = """\
name: feature-cache-test
data: {{dataset: synthetic, synthetic_size: 16, augment: cifar, image_size: 32, batch_size: 8,
        eval_batch_size: 8, workers: 0, views: 1}}
model: {{arch: resnet8}}
teacher: {{arch: resnet14, weights: {weights}, cache_dir: {cache}, cache_chunk: 8}}
method:
  name: compose
  terms:
    kd: {{T: 4, ce_weight: 1, kd_weight: 1}}
    fitnet: {{ce_weight: 0, beta: 100}}
    vid: {{ce_weight: 0, beta: 1, stages: [1, 3]}}
optim: {{epochs: 1}}
tracking: {{enabled: false}}
train: {{progress: false}}
"""


def test_cached_teacher_gives_the_online_first_step_losses(tmp_path: Path) -> None:
    """The cache stores logits and stages 1, 2, 3 only (fp16); the first batch's loss terms
    from it equal the online teacher's."""
    from pipeline.catalog import load_run_config
    from pipeline.data import AugPlan
    from pipeline.data.device import to_device
    from pipeline.data.loader import build_train_loader
    from pipeline.models import build_model
    from pipeline.teacher.cache_format import Manifest
    from pipeline.teacher.cache_writer import cache_fields, write_cache
    from pipeline.train.build import build_parts, method_class, method_options
    from pipeline.train.distiller import Distiller

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, weights)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CACHE_CONFIG.format(weights=weights, cache=tmp_path / "cache"))
    spec = load_run_config(cfg, [])
    needs = method_class(spec).requirements(method_options(spec))
    write_cache(spec, cache_fields(spec, needs.teacher_outputs), stages=needs.teacher_stages)
    manifest = Manifest.load(tmp_path / "cache")
    assert sorted(manifest.stages) == [1, 2, 3] and manifest.fields == ["logits", "feats"]

    def first_step(source: str) -> dict[str, torch.Tensor]:
        run = load_run_config(cfg, [f"teacher.source={source}"])
        torch.manual_seed(1)
        parts = build_parts(run, steps_per_epoch=2)
        plan = AugPlan.from_spec(run.data, run.seed)
        raw = next(iter(build_train_loader(parts.train_index, run.data, plan, 0, run.seed, 0, 1)))
        batch = to_device(raw, "cpu", run.data.mean, run.data.std)
        teacher = parts.teacher(batch, batch.images)
        with torch.no_grad():
            return Distiller(parts.student, parts.method)(batch.images, teacher, batch)

    online, cached = first_step("online"), first_step("cached")
    assert set(online) == set(cached) == {"ce", "kd", "fitnet", "vid"}
    for key in online:
        torch.testing.assert_close(cached[key], online[key], rtol=2e-3, atol=1e-4)
