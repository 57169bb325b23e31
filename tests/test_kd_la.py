"""KD+LA: the training-label prior and the adjusted KL against a float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.base import MethodContext
from pipeline.distill.kd_la import KDLA, KDLAOptions, class_log_prior
from pipeline.distill.losses import kd_loss
from pipeline.types import Batch, ModelOutput, TeacherOutput

C = 4
LABELS = torch.tensor([0, 0, 1, 2, 2, 2])  # class 3 dropped from the training set


def _ctx(labels: torch.Tensor | None = LABELS) -> MethodContext:
    n = 0 if labels is None else len(labels)
    return MethodContext(num_classes=C, student_dim=3, teacher_dim=3, epochs=1, steps_per_epoch=1,
                         num_train_samples=n, train_labels=labels)


def _loop_kd(z_s, z_t, log_prior, T, tau, inside):
    total = 0.0
    for b in range(len(z_s)):
        s = [(z_s[b][c] + tau * log_prior[c]) / T if inside else z_s[b][c] / T + tau * log_prior[c]
             for c in range(C)]
        t = [z_t[b][c] / T for c in range(C)]
        ls, lt = math.log(sum(math.exp(v) for v in s)), math.log(sum(math.exp(v) for v in t))
        for c in range(C):
            p = math.exp(t[c] - lt)
            total += p * ((t[c] - lt) - (s[c] - ls))
    return total / len(z_s) * T * T


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(5, C, generator=g, dtype=torch.float64) * 2,
            torch.randn(5, C, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, C, (5,), generator=g))


def test_prior_counts_the_training_labels() -> None:
    expected = torch.tensor([3.0, 2.0, 4.0, 1.0], dtype=torch.float64) / 10  # counts + 1
    torch.testing.assert_close(class_log_prior(LABELS, C), expected.log())
    plain = class_log_prior(LABELS[:-1], 3, smoothing=0.0)
    torch.testing.assert_close(plain, torch.tensor([0.4, 0.2, 0.4], dtype=torch.float64).log())
    with pytest.raises(ValueError, match=r"classes \[3\] without any training sample"):
        class_log_prior(LABELS, C, smoothing=0.0)
    with pytest.raises(ValueError, match="must lie in 0..3"):
        class_log_prior(torch.tensor([0, 4]), C)


@pytest.mark.parametrize("inside", [True, False])
def test_adjusted_kl_matches_a_loop(inside: bool) -> None:
    z_s, z_t, y = _inputs(1)
    method = KDLA(KDLAOptions(la_tau=0.7, prior_inside_temperature=inside), _ctx())
    batch = Batch(torch.zeros(5, 3, 2, 2), y, torch.arange(5), torch.zeros(5, dtype=torch.long))
    terms = method(ModelOutput(z_s.float(), torch.zeros(5, 3)), TeacherOutput(logits=z_t), batch)
    log_prior = class_log_prior(LABELS, C).tolist()
    ref = _loop_kd(z_s.tolist(), z_t.tolist(), log_prior, 4.0, 0.7, inside)
    assert terms["kd"].item() == pytest.approx(0.9 * ref, rel=1e-5)
    torch.testing.assert_close(terms["ce"], 0.1 * F.cross_entropy(z_s.float(), y))


def test_balanced_prior_is_plain_kd_and_ce_can_be_adjusted() -> None:
    z_s, z_t, y = _inputs(2)
    balanced = torch.arange(C).repeat(3)
    batch = Batch(torch.zeros(5, 3, 2, 2), y, torch.arange(5), torch.zeros(5, dtype=torch.long))
    method = KDLA(KDLAOptions(adjust_ce=True, ce_weight=1.0), _ctx(balanced))
    terms = method(ModelOutput(z_s.float(), torch.zeros(5, 3)), TeacherOutput(logits=z_t), batch)
    torch.testing.assert_close(terms["kd"], 0.9 * kd_loss(z_s.float(), z_t, 4.0))
    skewed = KDLA(KDLAOptions(adjust_ce=True, ce_weight=1.0), _ctx())
    terms = skewed(ModelOutput(z_s.float(), torch.zeros(5, 3)), TeacherOutput(logits=z_t), batch)
    adjusted = z_s.float() + class_log_prior(LABELS, C).float()
    torch.testing.assert_close(terms["ce"], F.cross_entropy(adjusted, y))
    assert "log_prior" not in skewed.state_dict()  # derived from the labels, not saved
    assert torch.equal(skewed.eval_logits(ModelOutput(z_s, torch.zeros(5, 3))), z_s)


def test_needs_the_training_labels() -> None:
    with pytest.raises(ValueError, match="needs the training labels"):
        KDLA(KDLAOptions(), _ctx(None))
