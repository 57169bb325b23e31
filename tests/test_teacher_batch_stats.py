"""A teacher whose BatchNorm uses each batch's statistics (``Requirements.teacher_batch_stats``,
the official ReviewKD CIFAR code's teacher left in train mode), without changing its buffers."""

from __future__ import annotations

import copy

import torch

from pipeline.distill.requirements import Requirements, merge
from pipeline.models import build_model
from pipeline.models.features import probe_feature_info
from pipeline.teacher.online import OnlineTeacher
from pipeline.types import Batch


def _batch(x: torch.Tensor) -> Batch:
    n = x.shape[0]
    return Batch(x, torch.zeros(n), torch.arange(n), torch.zeros(n))


def test_batch_statistics_without_touching_the_running_estimates() -> None:
    torch.manual_seed(0)
    net = build_model("resnet8", 10)
    for m in net.modules():  # running estimates far from any batch's, so the modes differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(3.0)
    reference = copy.deepcopy(net).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    teacher = OnlineTeacher(net, ("logits",), stages=(2,), preact=True, batch_stats=True)
    plain = OnlineTeacher(copy.deepcopy(net), ("logits",), stages=(2,), preact=True)
    x = torch.randn(4, 3, 32, 32)
    probe_feature_info(net, 24)  # a probe's eval()/train(False) must not undo the mode
    got = teacher(_batch(x), x)
    with torch.no_grad():
        want = reference(x, feats=(2,), preact=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.feats[2], want.feats[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(_batch(x), x).logits, got.logits, atol=1e-3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked included
    # The result depends on the batch: the first two samples alone give other outputs.
    assert not torch.allclose(teacher(_batch(x[:2]), x[:2]).logits, got.logits[:2], atol=1e-4)


def test_merge_asks_for_batch_statistics_when_one_term_does() -> None:
    merged = merge([("kd", Requirements()), ("reviewkd", Requirements(teacher_batch_stats=True))])
    assert merged.teacher_batch_stats
    assert not merge([("kd", Requirements())]).teacher_batch_stats
