"""SRRL against a transcription of the official statm_loss / MSE, both layouts, the frozen teacher
classifier (never optimised, never in student.pt), and online vs cached first-step losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.catalog import load_run_config
from pipeline.config.schema import OptimSpec
from pipeline.data import AugPlan, build_index, to_device
from pipeline.data.loader import build_train_loader
from pipeline.distill.base import MethodContext
from pipeline.distill.srrl import SRRL, SRRLOptions
from pipeline.teacher.cache_writer import write_cache
from pipeline.teacher.parts import TeacherParts
from pipeline.train.build import build_parts
from pipeline.train.optim import build_optimizer
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput

CLASSES, C_T = 6, 16


def _ctx(c_s: int = 8, hw: int = 4, d_s: int = 8) -> MethodContext:
    torch.manual_seed(1)
    stages = (StageInfo(0, "stem", 4, 8, 8, 1, False), StageInfo(1, "last", c_s, hw, hw, 2, True))
    return MethodContext(num_classes=CLASSES, student_dim=d_s, teacher_dim=C_T, epochs=1,
                         steps_per_epoch=1, student_stages=stages,
                         teacher_parts=TeacherParts(classifier=_frozen_fc()))


def _frozen_fc() -> torch.nn.Linear:
    fc = torch.nn.Linear(C_T, CLASSES)
    fc.requires_grad_(False)
    return fc


def _statm_loss(x, y):
    """KD_SRRL ``statm_loss``: squared gap of spatial means, mean over channels and samples."""
    x, y = x.view(x.size(0), x.size(1), -1), y.view(y.size(0), y.size(1), -1)
    return (x.mean(dim=2) - y.mean(dim=2)).pow(2).mean(1).mean()


def _loop_mse(a, b):
    a, b = a.double().tolist(), b.double().tolist()
    return sum((x - y) ** 2 for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True)) / (len(a) * len(a[0]))


@pytest.mark.parametrize("b,c_s,hw", [(2, 8, 4), (5, 3, 2)])  # batch of 2; other channels, size
def test_map_layout_matches_the_official_losses(b: int, c_s: int, hw: int) -> None:
    method = SRRL(SRRLOptions(fm_weight=0.5, sr_weight=2.0, beta=3.0), _ctx(c_s, hw))
    g = torch.Generator().manual_seed(b)
    f_s = torch.randn(b, c_s, hw, hw, generator=g, requires_grad=True)
    f_t = torch.relu(torch.randn(b, C_T, 7, 7, generator=g))  # another spatial size
    z_t = torch.randn(b, CLASSES, generator=g)
    y = torch.randint(0, CLASSES, (b,), generator=g)
    student = ModelOutput(torch.randn(b, CLASSES, generator=g), torch.zeros(b, 8), {1: f_s})
    teacher = TeacherOutput(logits=z_t, embedding=f_t.mean((2, 3)))
    batch = Batch(torch.zeros(b, 3, 2, 2), y, torch.arange(b), torch.zeros_like(y))
    terms = method(student, teacher, batch)
    mapped = method.connector(f_s)  # the official code: statm_loss on the maps
    fm = _statm_loss(mapped, f_t)
    pooled = F.adaptive_avg_pool2d(mapped, 1).flatten(1)
    sr = _loop_mse(method.teacher_classifier(pooled), z_t)
    assert terms["srrl_fm"].item() == pytest.approx(3.0 * 0.5 * fm.item(), rel=1e-5)
    assert terms["srrl_sr"].item() == pytest.approx(3.0 * 2.0 * sr, rel=1e-5)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student.logits, y))
    sum(terms.values()).backward()
    assert f_s.grad is not None and method.connector[0].weight.grad is not None
    assert method.teacher_classifier.weight.grad is None


def test_pooled_layout_is_simkds() -> None:
    method = SRRL(SRRLOptions(layout="pooled", ce_weight=0.0), _ctx(d_s=5))
    assert method.connector[0].in_channels == 5 and not method.needs.student_stages
    h_s = torch.randn(3, 5)
    z_t, h_t = torch.randn(3, CLASSES), torch.randn(3, C_T)
    batch = Batch(torch.zeros(3, 3, 2, 2), torch.zeros(3, dtype=torch.long), torch.arange(3),
                  torch.zeros(3, dtype=torch.long))
    terms = method(ModelOutput(torch.randn(3, CLASSES), h_s), TeacherOutput(z_t, h_t), batch)
    trans = method.connector(h_s.unsqueeze(-1).unsqueeze(-1)).view(3, -1)  # SimKD's SRRL
    assert "ce" not in terms
    torch.testing.assert_close(terms["srrl_fm"], F.mse_loss(trans, h_t))
    torch.testing.assert_close(terms["srrl_sr"], F.mse_loss(method.teacher_classifier(trans), z_t))


def test_needs_the_teacher_classifier() -> None:
    ctx = _ctx()
    bare = MethodContext(**{**ctx.__dict__, "teacher_parts": None})
    with pytest.raises(ValueError, match="needs the teacher's classifier"):
        SRRL(SRRLOptions(), bare)
    assert SRRL.requirements(SRRLOptions()).teacher_modules == ("classifier",)


CONFIG = """\
name: srrl-test
data: {{dataset: synthetic, synthetic_size: 16, augment: cifar, image_size: 32, batch_size: 8,
       eval_batch_size: 8, workers: 0, views: 1, num_classes: 10}}
model: {{arch: resnet8}}
teacher: {{arch: resnet20, weights: {weights}, cache_dir: {cache}}}
method: {{name: srrl}}
optim: {{epochs: 1}}
tracking: {{enabled: false}}
train: {{progress: false}}
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.models import build_model

    root = tmp_path_factory.mktemp("srrl")
    torch.manual_seed(5)
    torch.save({"model": build_model("resnet20", 10).state_dict()}, root / "t.pt")
    path = root / "run.yaml"
    path.write_text(CONFIG.format(weights=root / "t.pt", cache=root / "cache"))
    write_cache(load_run_config(path), ("logits", "embedding"), progress=False)
    return path


def _first_step(spec) -> tuple[dict, object]:
    torch.manual_seed(0)  # the same student and connector for both sources
    parts = build_parts(spec, steps_per_epoch=2)
    index = build_index(spec.data, "train")
    raw = next(iter(build_train_loader(index, spec.data, AugPlan.from_spec(spec.data, spec.seed),
                                       0, spec.seed, 0, 1)))
    batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
    with torch.no_grad():
        out = parts.student(batch.images, feats=(3,))
        terms = parts.method(out, parts.teacher(raw, batch.images), batch)
    return terms, parts


def test_cached_first_step_equals_online_and_the_classifier_stays_out(cfg) -> None:
    online, parts = _first_step(load_run_config(cfg))
    cached, cached_parts = _first_step(load_run_config(cfg, ["teacher.source=cached"]))
    assert type(cached_parts.teacher).__name__ == "CachedTeacher"
    for k in ("ce", "srrl_fm", "srrl_sr"):  # the cache stores fp16
        torch.testing.assert_close(cached[k], online[k], rtol=2e-3, atol=1e-4)
    state = torch.load(load_run_config(cfg).teacher.weights)["model"]
    fc = parts.method.teacher_classifier
    assert torch.equal(fc.weight, state["fc.weight"])
    assert torch.equal(cached_parts.method.teacher_classifier.weight, state["fc.weight"])
    optimised = {id(p) for g in build_optimizer(parts.student, parts.method,
                                                OptimSpec()).param_groups for p in g["params"]}
    assert id(fc.weight) not in optimised and id(fc.bias) not in optimised
    assert all(id(p) in optimised for p in parts.method.connector.parameters())
    assert not any(k.startswith("teacher") for k in parts.student.state_dict())
    assert "teacher_classifier.weight" in parts.method.state_dict()  # saved with the method
