"""CSKD against a transcription of the authors' loop code (correlation, cluster, cluster_filter,
the intra / inter terms), values and gradients, on tiny batches with a one-sample class and a
class that no network classifies correctly; the adaptation's connector and pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.base import MethodContext
from pipeline.distill.cskd import CSKD, CSKDOptions, cskd_parts
from pipeline.types import Batch, ModelOutput, StageInfo, TeacherOutput

CLASSES = 5


def correlation(feature):  # the code's inter-correlation of (K, C, H, W) centres
    rows = []
    for i in range(feature.size(0)):
        tmp = feature[i].reshape(1, *feature[i].shape).expand(feature.size(0), -1, -1, -1)
        rows.append((tmp * feature).sum(dim=[1, 2, 3]) / (tmp**2).sum(dim=[1, 2, 3]).sqrt()
                    / (feature**2).sum(dim=[1, 2, 3]).sqrt())
    return torch.stack(rows)


def correlation_logits(feature):
    rows = []
    for i in range(feature.size(0)):
        tmp = feature[i].reshape(1, -1).expand(feature.size(0), -1)
        rows.append((tmp * feature).sum(-1) / (tmp**2).sum(-1).sqrt() / (feature**2).sum(-1).sqrt())
    return torch.stack(rows)


def cluster(feature, label, num_classes):
    groups = [[] for _ in range(num_classes)]
    for i in range(feature.size(0)):
        groups[label[i]].append(feature[i])
    centres = [sum(g) / len(g) if g else None for g in groups]
    valid = [c for c in centres if c is not None]
    return torch.stack([centres[label[i]] for i in range(feature.size(0))]), torch.stack(valid)


def cluster_filter(feature, pred, label, num_classes):
    groups = [[] for _ in range(num_classes)]
    for i in range(feature.size(0)):
        if pred[i] == label[i]:
            groups[label[i]].append(feature[i])
    res = []
    for i in range(feature.size(0)):
        g = groups[label[i]]
        res.append(sum(g) / len(g) if g else feature[i])
    return torch.stack(res)


def reference(sf4, tf4, s_out, t_out, label):
    """``train_cifar.py`` lines 199-235 with use_filter = True."""
    mse = torch.nn.MSELoss()
    t_pred, s_pred = t_out.argmax(1), s_out.argmax(1)
    TF4 = cluster_filter(tf4, t_pred, label, CLASSES)
    SF4 = cluster_filter(sf4, s_pred, label, CLASSES)
    _, T_center_list = cluster(tf4, label, CLASSES)
    _, S_center_list = cluster(sf4, label, CLASSES)
    T_OUT, T_logits = cluster(t_out, label, CLASSES)
    S_OUT, S_logits = cluster(s_out, label, CLASSES)
    center, _ = cluster(s_out, label, CLASSES)
    intra = 0.002 * (mse((tf4 - TF4).detach(), sf4 - SF4.detach()) / TF4.size(1) / TF4.size(2)
                     / TF4.size(3) + mse((t_out - T_OUT).detach(), s_out - S_OUT.detach())
                     / T_OUT.size(1)) + 0.1 * mse(s_out, center.detach())
    T_cor, S_cor = correlation(T_center_list), correlation(S_center_list)
    T_cl, S_cl = correlation_logits(T_logits), correlation_logits(S_logits)
    inter = 0.04 * (mse(T_cor.detach(), S_cor) / T_cor.size(1) + mse(T_cl.detach(), S_cl)
                    / T_cl.size(1))
    return intra, inter


def _case(seed: int, b: int):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64)
    f_t = torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64)
    z_s = torch.randn(b, CLASSES, generator=g, dtype=torch.float64)
    z_t = torch.randn(b, CLASSES, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)  # classes 3, 4 absent
    y[0] = 4  # a class with a single sample
    z_t[0, 4] = 10.0  # ... which the teacher gets right and
    z_s[0, 4] = -10.0  # the student wrong: its filtered centre is its own feature
    return f_s, f_t, z_s, z_t, y


@pytest.mark.parametrize("seed,b", [(0, 8), (1, 2), (2, 5)])
def test_values_and_gradients_match_the_code(seed: int, b: int) -> None:
    f_s, f_t, z_s, z_t, y = _case(seed, b)
    ours = [t.clone().requires_grad_() for t in (f_s, z_s)]
    theirs = [t.clone().requires_grad_() for t in (f_s, z_s)]
    intra, inter = cskd_parts(ours[0], f_t, ours[1], z_t, y)
    ref_intra, ref_inter = reference(theirs[0], f_t, theirs[1], z_t, y.tolist())
    torch.testing.assert_close(intra, ref_intra, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(inter, ref_inter, rtol=1e-9, atol=1e-12)
    (intra + 3 * inter).backward()
    (ref_intra + 3 * ref_inter).backward()
    for a, r in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)


def test_no_correct_prediction_at_all() -> None:
    f_s, f_t, z_s, z_t, y = _case(3, 6)
    z_s = z_s.clone()
    z_s[torch.arange(6), y] = -50.0  # the student is wrong everywhere
    intra, inter = cskd_parts(f_s, f_t, z_s, z_t, y)
    ref_intra, ref_inter = reference(f_s, f_t, z_s, z_t, y.tolist())
    torch.testing.assert_close(intra, ref_intra)
    torch.testing.assert_close(inter, ref_inter)


def _ctx(c_s: int, hw_s: int, c_t: int, hw_t: int) -> MethodContext:
    s = (StageInfo(0, "stem", 2, 8, 8, 1, False), StageInfo(1, "last", c_s, hw_s, hw_s, 4, True))
    t = (StageInfo(0, "stem", 2, 8, 8, 1, False), StageInfo(1, "last", c_t, hw_t, hw_t, 4, True))
    return MethodContext(num_classes=CLASSES, student_dim=c_s, teacher_dim=c_t, epochs=1,
                         steps_per_epoch=1, student_stages=s, teacher_stages=t)


def test_method_projects_and_pools_then_applies_the_code() -> None:
    torch.manual_seed(0)
    method = CSKD(CSKDOptions(beta=2.0, logit_mse_weight=1e-6), _ctx(3, 4, 6, 2))
    assert isinstance(method.branch, torch.nn.Conv2d) and method.branch.bias is None
    f_s, _, z_s, z_t, y = _case(4, 2)  # batch of 2
    f_s = torch.randn(2, 3, 4, 4, dtype=torch.float64).float()
    f_t = torch.randn(2, 6, 2, 2)
    student = ModelOutput(z_s.float(), torch.zeros(2, 3), {1: f_s})
    teacher = TeacherOutput(logits=z_t.float(), feats={1: f_t})
    batch = Batch(torch.zeros(2, 3, 2, 2), y, torch.arange(2), torch.zeros_like(y))
    terms = method(student, teacher, batch)
    mapped = F.adaptive_avg_pool2d(method.branch(f_s), 2)
    intra, inter = reference(mapped, f_t, z_s.float(), z_t.float(), y.tolist())
    torch.testing.assert_close(terms["cskd_intra"], 2 * intra)
    torch.testing.assert_close(terms["cskd_inter"], 2 * inter)
    torch.testing.assert_close(terms["cskd_logit_mse"], 1e-6 * F.mse_loss(z_s.float(), z_t.float()))
    torch.testing.assert_close(terms["ce"], F.cross_entropy(z_s.float(), y))
    same = CSKD(CSKDOptions(ce_weight=0), _ctx(6, 2, 6, 2))
    assert isinstance(same.branch, torch.nn.Identity) and not list(same.parameters())
    assert CSKD.requirements(CSKDOptions()).teacher_stages == (-1,)
    with pytest.raises(ValueError, match="stage: expected a stage index other than the stem"):
        CSKDOptions(stage=0)
