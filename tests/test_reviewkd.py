"""ReviewKD: HCL against torchdistill 1.1.5's HierarchicalContextLoss summed over levels, the
review chain against a transcription of the official forward, shapes, warm-up, requirements,
and the cached teacher's first-step losses against the online teacher's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import HierarchicalContextLoss

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.distill.base import MethodContext
from pipeline.distill.reviewkd import ABF, ReviewChain, ReviewKD, ReviewKDOptions, hcl
from pipeline.models import build_model
from pipeline.types import Batch, TeacherOutput
from tests.conftest import ROOT


def test_hcl_matches_torchdistill_summed_over_levels() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [(3, 8), (5, 4), (7, 2), (6, 1)]  # (channels, H): 3, 2, 1 and 0 pooled terms
    fs = [torch.randn(2, c, h, h, generator=g, dtype=torch.float64) for c, h in sizes]
    ft = [torch.randn(2, c, h, h, generator=g, dtype=torch.float64) for c, h in sizes]
    td = HierarchicalContextLoss("s", "output", "t", "output", reduction="mean",
                                 output_sizes=[4, 2, 1])
    want = sum(td({"s": {"output": (s, None)}}, {"t": {"output": t}})
               for s, t in zip(fs, ft, strict=True))
    torch.testing.assert_close(hcl(fs, ft).double(), want, rtol=1e-5, atol=1e-7)
    # and by hand for the 8×8 level: (mse + mse4/2 + mse2/4 + mse1/8) / 1.875
    pools = [F.mse_loss(F.adaptive_avg_pool2d(fs[0], k), F.adaptive_avg_pool2d(ft[0], k)) * w
             for k, w in ((4, 0.5), (2, 0.25), (1, 0.125))]
    level = (F.mse_loss(fs[0], ft[0]) + sum(pools)) / 1.875
    torch.testing.assert_close(hcl(fs[:1], ft[:1]).double(), level, rtol=1e-6, atol=1e-8)


def _official_abf(m: ABF, x, y, shape, out_shape):
    """The official ABF.forward (``CIFAR-100/model/reviewkd.py#L42-56``), transcribed."""
    n, _, h, w = x.shape
    x = m.conv1(x)
    if m.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = m.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return m.conv2(x), x


def _official_chain(chain: ReviewChain, feats, shapes, out_shapes):
    """The official ReviewKD.forward on shallow → deep ``feats``; shapes deepest first."""
    x, abfs = feats[::-1], list(chain.abfs)[::-1]
    out, res = _official_abf(abfs[0], x[0], None, None, out_shapes[0])
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:], strict=True):
        out, res = _official_abf(abf, f, res, shape, out_shape)
        results.insert(0, out)
    return results


def test_chain_matches_the_official_forward_with_mismatched_shapes() -> None:
    """shufflev1 → WRN-40-2-like levels: channels and spatial sizes all differ."""
    torch.manual_seed(0)
    in_c, out_c = [24, 48, 96, 96], [8, 16, 32, 32]
    s_sizes, t_sizes = [16, 8, 4, 1], [32, 16, 8, 1]
    chain = ReviewChain(in_c, out_c, [(s, s) for s in t_sizes], mid_channels=16)
    feats = [torch.randn(2, c, s, s) for c, s in zip(in_c, s_sizes, strict=True)]  # batch of 2
    got = chain(feats)
    want = _official_chain(chain, feats, s_sizes[::-1], t_sizes[::-1])
    for a, b, c, s in zip(got, want, out_c, t_sizes, strict=True):
        assert a.shape == (2, c, s, s)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert chain.abfs[-1].att_conv is None and all(a.att_conv is not None for a in chain.abfs[:-1])


def _context(student: str, teacher: str, size: int = 32) -> MethodContext:
    s, t = build_model(student, 100), build_model(teacher, 100)
    return MethodContext(100, s.embedding_dim, t.embedding_dim, epochs=240, steps_per_epoch=1,
                         student_stages=s.stage_info(size), teacher_stages=t.stage_info(size))


def test_method_on_real_networks_and_gradients() -> None:
    torch.manual_seed(0)
    student_net, teacher_net = build_model("shufflev1", 100), build_model("wrn_16_2", 100).eval()
    ctx = _context("shufflev1", "wrn_16_2")
    method = ReviewKD(ReviewKDOptions(beta=5.0, warmup_epochs=0), ctx)
    needs = method.needs
    x = torch.randn(2, 3, 32, 32)
    s_out = student_net(x, feats=needs.resolve_student(len(ctx.student_stages)),
                        preact=needs.student_preact)
    with torch.no_grad():
        t_out = teacher_net(x, feats=needs.resolve_teacher(len(ctx.teacher_stages)),
                            preact=needs.teacher_preact)
    batch = Batch(x, torch.tensor([3, 7]), torch.arange(2), torch.zeros(2))
    terms = method(s_out, TeacherOutput.from_model(t_out), batch)
    assert set(terms) == {"ce", "reviewkd"}
    s_levels, t_levels = method.levels(s_out, TeacherOutput.from_model(t_out))
    outputs = method.chain(s_levels)
    assert [o.shape for o in outputs] == [t.shape for t in t_levels]
    assert t_levels[-1].shape == (2, 128, 1, 1)
    torch.testing.assert_close(terms["reviewkd"], 5.0 * hcl(outputs, t_levels))
    terms["reviewkd"].backward()
    assert all(p.grad is not None for p in method.parameters())
    assert student_net.conv1.weight.grad is not None


def test_warmup_factor_and_recipes() -> None:
    ctx = _context("resnet8", "resnet14")
    official = ReviewKD(ReviewKDOptions(), ctx)
    md = ReviewKD(ReviewKDOptions(recipe="mdistiller"), ctx)
    for epoch, want_official, want_md in ((0, 0.0, 0.05), (10, 0.5, 0.55), (19, 0.95, 1.0),
                                          (30, 1.0, 1.0)):
        official.start_epoch(epoch)
        md.start_epoch(epoch)
        assert official.warmup_factor() == pytest.approx(want_official)
        assert md.warmup_factor() == pytest.approx(want_md)
    with pytest.raises(ValueError, match="never reach its full weight"):
        ReviewKD.check_run(ReviewKDOptions(warmup_epochs=20), 8)


def test_requirements_per_recipe_and_flavours() -> None:
    cifar = ReviewKD.requirements(ReviewKDOptions())
    assert not cifar.student_preact and cifar.teacher_preact and cifar.teacher_batch_stats
    assert cifar.student_stages == ("all",) and cifar.teacher_fields == ("embedding",)
    assert not ReviewKD.requirements(ReviewKDOptions(recipe="mdistiller")).teacher_batch_stats
    assert not ReviewKD.requirements(ReviewKDOptions(teacher_bn="eval")).teacher_batch_stats
    imagenet = ReviewKD.requirements(ReviewKDOptions(student_preact=True))
    assert imagenet.preact
    with pytest.raises(ValueError, match="as many student as teacher stage maps"):
        ReviewKD(ReviewKDOptions(student_stages=(1, 2)), _context("resnet8", "resnet14"))
    with pytest.raises(ValueError, match="recipe: expected one of"):
        ReviewKDOptions(recipe="rd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_bn: expected"):
        ReviewKDOptions(teacher_bn="train")  # type: ignore[arg-type]


def test_a_batch_statistics_teacher_is_never_cached(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cache_teacher import main

    cfg = ROOT / "configs/demo/reviewkd.yaml"
    with pytest.raises(ConfigError, match="teacher.source: expected 'online'"):
        load_run_config(cfg, ["method.teacher_bn=batch", "teacher.source=cached", "data.views=2",
                              "teacher.cache_dir=somewhere"], check_paths=False)
    args = ["method.teacher_bn=batch", "data.dataset=synthetic", "teacher.weights=null",
            f"teacher.cache_dir={tmp_path / 'cache'}"]
    assert main(["--cfg", str(cfg), *[x for a in args for x in ("--set", a)]]) == 2
    assert "cannot be cached" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cached_teacher_gives_the_online_first_step_losses(tmp_path: Path) -> None:
    """A cache of the teacher's stage maps (pre-ReLU) and embedding serves the same losses."""
    from pipeline.data import AugPlan, build_index
    from pipeline.data.device import to_device
    from pipeline.data.loader import build_train_loader
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.train.build import build_parts, build_teacher_source

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, weights)
    spec = load_run_config(ROOT / "configs/demo/reviewkd.yaml", [
        "data.dataset=synthetic", "data.synthetic_size=16", "data.views=1", "data.batch_size=8",
        "teacher.arch=resnet14", f"teacher.weights={weights}", "method.warmup_epochs=0",
        f"teacher.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"],
        check_paths=False)
    parts = build_parts(spec, steps_per_epoch=2)
    needs = parts.method.needs
    write_cache(spec, needs.teacher_outputs, stages=needs.teacher_stages,
                preact=needs.teacher_preact, progress=False)
    spec.teacher.source = "cached"
    cached, _ = build_teacher_source(spec, needs, 10, True, parts.train_index)
    index = build_index(spec.data, "train")
    plan = AugPlan.from_spec(spec.data, spec.seed)
    raw = next(iter(build_train_loader(index, spec.data, plan, 0, spec.seed, 0, 1)))
    batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
    student = parts.student(batch.images, feats=needs.resolve_student(4), preact=False)
    online_terms = parts.method(student, parts.teacher(raw, batch.images), batch)
    cached_terms = parts.method(student, cached(raw, batch.images), batch)
    assert cached.stages == (1, 2, 3)
    assert online_terms["reviewkd"] > 0
    for key in ("ce", "reviewkd"):
        torch.testing.assert_close(cached_terms[key], online_terms[key], rtol=2e-3, atol=2e-4)
