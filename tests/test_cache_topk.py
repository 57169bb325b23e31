"""Top-k teacher caches: the stored distribution is rebuilt exactly for the top-k classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.data import AugPlan, build_index
from pipeline.data.device import to_device
from pipeline.data.loader import build_train_loader
from pipeline.teacher.cache_format import Manifest
from pipeline.teacher.cache_writer import write_cache
from pipeline.teacher.cached import open_cached_teacher
from pipeline.teacher.online import build_teacher_model
from pipeline.teacher.topk import index_dtype, rebuild_logits, rebuild_probs, topk_probs

T = 4.0


def _stored(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cache holds: fp16 probabilities at T and their class indices."""
    p, i = topk_probs(logits, k, T)
    return p.half(), i.to(torch.int16)


def test_softmax_of_rebuilt_logits_is_the_stored_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 100, generator=g) * 6
    p16, idx = _stored(z, 7)
    rebuilt = rebuild_logits(p16, idx, 100, T)
    assert rebuilt.dtype == torch.float32 and torch.isfinite(rebuilt).all()
    q = torch.softmax(rebuilt / T, dim=1)
    # the top-k entries are exactly the stored probabilities (float32 rounding only) ...
    torch.testing.assert_close(q.gather(1, idx.long()), p16.float(), rtol=1e-5, atol=0)
    # ... the rest of the mass is spread uniformly over the other classes ...
    rest = (1 - p16.float().sum(1, keepdim=True)) / (100 - 7)
    others = q.clone().scatter_(1, idx.long(), float("nan"))
    mask = ~torch.isnan(others)
    torch.testing.assert_close(others[mask].view(16, 93), rest.expand(16, 93), rtol=1e-5, atol=0)
    # ... and the logits of two top-k classes differ as the teacher's do (fp16-rounded p).
    dz = rebuilt.gather(1, idx.long()) - rebuilt.gather(1, idx[:, :1].long())
    dz_true = z.gather(1, idx.long()) - z.gather(1, idx[:, :1].long())
    torch.testing.assert_close(dz, dz_true, rtol=0, atol=T * 2 * 2**-11 * 1.01)


def test_all_mass_in_topk_stays_finite() -> None:
    z = torch.tensor([[60.0, 0.0, -5.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    p16, idx = _stored(z, 2)
    full = rebuild_probs(p16, idx, 4)
    assert torch.isfinite(rebuild_logits(p16, idx, 4, T)).all()
    assert idx[0].tolist() == [0, 3] and full[0, 0] == 1.0
    assert 0 < full[0, [1, 2]].max() < 1e-30  # no mass left for the others: a tiny floor
    torch.testing.assert_close(full[1], torch.full((4,), 0.25))
    p_all, i_all = _stored(z, 4)  # k = C: the stored distribution itself
    torch.testing.assert_close(rebuild_probs(p_all, i_all, 4), torch.softmax(z / T, 1),
                               rtol=1e-3, atol=1e-7)


def test_bad_arguments_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="0 < k <= 4"):
        topk_probs(torch.zeros(2, 4), 5, T)
    with pytest.raises(ValueError, match="same shape"):
        rebuild_probs(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), 4)
    assert index_dtype(1000) == np.int16 and index_dtype(40000) == np.int32


CONFIG = """\
data: {{dataset: synthetic, synthetic_size: 40, augment: cifar, image_size: 32, batch_size: 8,
       eval_batch_size: 16, workers: 0, views: 1}}
model: {{arch: resnet8}}
teacher: {{arch: resnet8, weights: {weights}, cache_dir: {cache}, cache_topk: 3, cache_chunk: 16}}
method: {{name: kd, T: 4}}
optim: {{epochs: 1}}
tracking: {{enabled: false}}
train: {{progress: false}}
"""


def test_topk_cache_end_to_end(tmp_path: Path) -> None:
    from pipeline.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet8", 10).state_dict(), tmp_path / "t.pt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(weights=tmp_path / "t.pt", cache=tmp_path / "c"))
    spec = load_run_config(cfg)
    write_cache(spec, ("logits",))
    m = Manifest.load(tmp_path / "c")
    assert m.logits == {"mode": "topk", "k": 3, "temperature": 4.0}
    assert {n: a.dtype for n, a in m.arrays.items()} == {
        "logits_topk_i": "int16", "logits_topk_p": "float16"}
    cached = open_cached_teacher(spec, ("logits",), 10)
    model, _ = build_teacher_model(spec.teacher, 10)
    model.eval()
    index = build_index(spec.data, "train")
    plan = AugPlan.from_spec(spec.data, spec.seed)
    for raw in build_train_loader(index, spec.data, plan, 0, spec.seed, 0, 1):
        batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
        with torch.no_grad():
            p_true = torch.softmax(model(batch.images).logits / T, 1)
        q = torch.softmax(cached(batch, batch.images).logits / T, 1)
        top_p, top_i = p_true.topk(3, dim=1)
        torch.testing.assert_close(q.gather(1, top_i), top_p, rtol=2e-3, atol=1e-6)
    with pytest.raises(ConfigError, match=r"method.T \(temp.*cache has 4.0, this run has 2.0"):
        open_cached_teacher(load_run_config(cfg, ["method.T=2"]), ("logits",), 10)
