"""Linear probe and weighted k-NN against naive float64 implementations; feature extraction;
launch/probe.py on a tiny run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate.probe import (
    ProbeRecipe,
    extract_features,
    knn_metrics,
    knn_scores,
    train_linear_probe,
)
from pipeline.types import Batch


def naive_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, c: int, k: int,
              t: float) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(test), c))
    for i, q in enumerate(test):
        q = q / np.linalg.norm(q)
        sims = sorted(((float(q @ x), j) for j, x in enumerate(train)), reverse=True)[:k]
        for s, j in sims:
            out[i, labels[j]] += math.exp(s / t)
    return out


@pytest.mark.parametrize("k,chunk", [(5, 7), (20, 256), (200, 3)])
def test_knn_matches_naive(k: int, chunk: int) -> None:
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(60, 6)), rng.normal(size=(25, 6))
    labels = rng.integers(0, 4, size=60)
    got = knn_scores(torch.tensor(train), torch.tensor(labels), torch.tensor(test), 4, k, 0.07,
                     chunk)
    want = naive_knn(train, labels, test, 4, min(k, 60), 0.07)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4)


def test_knn_on_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    y = torch.arange(90) % 3
    x = centres[y] + 0.3 * torch.randn(90, 8, generator=g)
    scores = knn_scores(x[:60], y[:60], x[60:], 3, k=20)
    assert knn_metrics(scores, y[60:])["top1"] == 100.0


def test_recipe_milestones() -> None:
    assert ProbeRecipe().milestones == [50, 70, 90]
    r = ProbeRecipe(epochs=10)
    assert r.milestones == [5, 7, 9]
    assert [r.lr_at(e) for e in (0, 4, 5, 7, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 1e-4])
    with pytest.raises(ValueError):
        ProbeRecipe(epochs=0)


def naive_probe(views: list[np.ndarray], y: np.ndarray, c: int, r: ProbeRecipe) -> np.ndarray:
    """SGD (momentum, weight decay as torch.optim.SGD) on softmax regression, float64, with the
    same random draws as train_linear_probe; returns [W | b]."""
    gen = torch.Generator().manual_seed(r.seed)
    d = views[0].shape[1]
    w = (torch.randn(c, d, generator=gen) * 0.01).double().numpy()
    b = np.zeros(c)
    buf_w, buf_b = None, None
    n = len(y)
    for epoch in range(r.epochs):
        lr = r.lr_at(epoch)
        x = views[epoch % len(views)]
        perm = torch.randperm(n, generator=gen).numpy()
        for s in range(0, n, r.batch_size):
            idx = perm[s : s + r.batch_size]
            z = x[idx] @ w.T + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            gw = p.T @ x[idx] / len(idx) + r.weight_decay * w
            gb = p.sum(axis=0) / len(idx) + r.weight_decay * b
            buf_w = gw if buf_w is None else r.momentum * buf_w + gw
            buf_b = gb if buf_b is None else r.momentum * buf_b + gb
            w, b = w - lr * buf_w, b - lr * buf_b
    return np.concatenate([w, b[:, None]], axis=1)


def test_linear_probe_matches_naive_sgd() -> None:
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(37, 5)), rng.normal(size=(37, 5))]
    y = rng.integers(0, 3, size=37)
    r = ProbeRecipe(epochs=4, batch_size=8, milestones=[2, 3], seed=3)
    head, history = train_linear_probe([torch.tensor(v, dtype=torch.float32) for v in views],
                                       torch.tensor(y), 3, r)
    got = torch.cat([head.weight, head.bias[:, None]], dim=1).detach().double().numpy()
    np.testing.assert_allclose(got, naive_probe(views, y, 3, r), rtol=1e-4, atol=1e-6)
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0]


def test_linear_probe_learns_separable_data() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(200) % 4
    x = torch.eye(4, 16)[y] * 3 + 0.5 * torch.randn(200, 16, generator=g)
    head, history = train_linear_probe([x[:150]], y[:150], 4, ProbeRecipe(epochs=10),
                                       {"test": (x[150:], y[150:])})
    assert history[-1]["test/top1"] == 100.0
    assert (head(x[150:]).argmax(1) == y[150:]).all()


def test_extract_features_drops_padding_and_sorts_by_index() -> None:
    def batch(idx: list[int]) -> Batch:
        i = torch.tensor(idx)
        images = i.clamp(min=0).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
        return Batch(images, i.clamp(min=0) % 2, i, torch.full_like(i, -1))

    x, y, i = extract_features(lambda im: im.flatten(1)[:, :2] * 2, [batch([3, 1, -1]),
                               batch([0, 2, -1])], lambda b: b)
    assert i.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 0, 1]
    assert x[:, 0].tolist() == [0.0, 2.0, 4.0, 6.0]


def test_launch_probe_on_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from launch.probe import main
    from pipeline.catalog import load_run_config
    from pipeline.config import dump_config
    from pipeline.models import build_model

    cfg = tmp_path / "src.yaml"
    cfg.write_text("name: probe-test\ndata: {dataset: synthetic, synthetic_size: 40, workers: 0,"
                   " eval_batch_size: 16, eval_splits: [val, test]}\nmodel: {arch: resnet8}\n"
                   "tracking: {enabled: false}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_run_config(cfg)))
    torch.manual_seed(0)
    torch.save(build_model("resnet8", 10).state_dict(), run / "student.pt")
    assert main(["--run-dir", str(run), "--epochs", "3", "--knn-k", "5", "--cpu"]) == 0
    result = json.loads((run / "probe.json").read_text())
    assert set(result["probe"]) == {"val", "test"} and result["recipe"]["epochs"] == 3
    assert result["feature_dim"] == 64 and result["num_train"] == 40
    for split in ("val", "test"):
        assert 0.0 <= result["probe"][split]["top1"] <= 100.0
        assert 0.0 <= result["knn_k5"][split]["top1"] <= 100.0
    assert "linear probe top-1" in capsys.readouterr().out
    assert main(["--run-dir", str(tmp_path / "absent")]) == 2
