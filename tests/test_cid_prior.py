"""CID's P(c_i) as the measured class frequencies (``prior_factor: frequency``): the rules of
eqs. 6-7 against float64 loops, and the run builder handing the training labels over."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.distill.base import MethodContext
from pipeline.distill.cid import CIDIntervention, InterventionOptions
from pipeline.distill.cid_terms import class_frequencies, interventional_logits

C, D, B = 4, 3, 6


def _inputs(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(2 * D, C)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(C, 2 * D, generator=g))
        lin.bias.copy_(torch.randn(C, generator=g))
    h = torch.randn(B, D, generator=g)
    coeffs = torch.softmax(torch.randn(B, C, generator=g) * 2, dim=1)
    centres = torch.randn(C, D, generator=g)
    return lin, h, coeffs, centres


def naive(lin: nn.Linear, h, coeffs, centres, prior, rule: str) -> np.ndarray:
    """Eqs. 6 and 7 written out sample by sample in float64."""
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    h, a, c, p = (t.double().numpy() for t in (h, coeffs, centres, prior))
    out = np.zeros((B, C))
    for n in range(B):
        if rule == "nwgm":  # g([h ; Σ_i P(c_i) a_i c̄_i])
            context = sum(p[i] * a[n, i] * c[i] for i in range(C))
            out[n] = w @ np.concatenate([h[n], context]) + b
        else:  # log Σ_i P(c_i) softmax(g([h ; a_i c̄_i]))
            mix = np.zeros(C)
            for i in range(C):
                z = w @ np.concatenate([h[n], a[n, i] * c[i]]) + b
                mix += p[i] * np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            out[n] = np.log(mix)
    return out


def test_class_frequencies_count_the_labels() -> None:
    labels = [0, 2, 2, 3, 2, 0, 3, 3, 3]
    counts = Counter(labels)
    want = [counts.get(c, 0) / len(labels) for c in range(C)]
    got = class_frequencies(torch.tensor(labels), C)
    assert got.tolist() == pytest.approx(want, abs=1e-7) and got[1] == 0.0
    with pytest.raises(ValueError, match="labels in 0..3"):
        class_frequencies(torch.tensor([0, 4]), C)


@pytest.mark.parametrize("rule", ["nwgm", "full"])
def test_measured_prior_matches_the_equations(rule: str) -> None:
    lin, h, coeffs, centres = _inputs(1)
    prior = torch.tensor([0.5, 0.3, 0.0, 0.2])
    got = interventional_logits(lin, h, coeffs, centres, rule, prior=prior)
    want = naive(lin, h, coeffs, centres, prior, rule)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5, atol=1e-5)
    # a class with P(c_i) = 0 contributes nothing: its centre may be anything
    moved = centres.clone()
    moved[2] += 100.0
    torch.testing.assert_close(interventional_logits(lin, h, coeffs, moved, rule, prior=prior), got)


@pytest.mark.parametrize("rule", ["nwgm", "full"])
def test_uniform_measured_prior_is_the_one_over_c_rule(rule: str) -> None:
    lin, h, coeffs, centres = _inputs(2)
    uniform = torch.full((C,), 1.0 / C)
    torch.testing.assert_close(
        interventional_logits(lin, h, coeffs, centres, rule, prior=uniform),
        interventional_logits(lin, h, coeffs, centres, rule, prior_factor=True))


def test_frequency_prior_needs_the_labels_and_is_saved() -> None:
    ctx = MethodContext(C, D, None, epochs=3, steps_per_epoch=1)
    part = CIDIntervention(InterventionOptions(prior_factor="frequency", warmup_epochs=0), ctx)
    with pytest.raises(ValueError, match="needs the training labels"):
        part.start_epoch(0)
    part.use_train_labels(np.array([1, 1, 3, 0]))
    part.start_epoch(0)
    assert part.state_dict()["class_prior"].tolist() == [0.25, 0.5, 0.0, 0.25]
    plain = CIDIntervention(InterventionOptions(warmup_epochs=0), ctx)
    assert "class_prior" not in plain.state_dict()  # older checkpoints keep loading strictly


def test_run_builder_gives_the_measured_frequencies_of_the_training_set(tmp_path: Path) -> None:
    from pipeline.catalog import load_run_config
    from pipeline.data import build_index
    from pipeline.models import build_model
    from pipeline.train.build import build_parts

    torch.manual_seed(0)
    weights = tmp_path / "t.pt"
    torch.save(build_model("resnet8", 10).state_dict(), weights)
    cfg = tmp_path / "cid.yaml"
    cfg.write_text(f"""\
data: {{dataset: synthetic, synthetic_size: 50, workers: 0, drop_classes: [3, 6],
       drop_classes_keep: 2}}
model: {{arch: resnet8}}
teacher: {{arch: resnet8, weights: {weights}}}
method: {{name: cid, prior_factor: frequency}}
optim: {{epochs: 2}}
tracking: {{enabled: false}}
""")
    spec = load_run_config(cfg)
    parts = build_parts(spec, 1)
    prior = parts.method.parts["intervention"].class_prior
    # independently: 5 images of each class in the full split, 2 kept of classes 3 and 6
    full = build_index(spec.data, "train").labels
    counts = np.bincount(full, minlength=10).astype(float)
    counts[[3, 6]] = 2
    np.testing.assert_allclose(prior.numpy(), counts / counts.sum(), rtol=1e-6)
    assert np.bincount(parts.train_index.labels, minlength=10).tolist() == counts.tolist()
