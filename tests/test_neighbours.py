"""CoSS neighbour lists: chunked torch top-k against a brute-force float64 loop; the stored
file next to a real teacher cache (eval-view embeddings), its JSON, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.data.neighbours import info_path, load_neighbours, neighbours_path
from pipeline.teacher.neighbours import (
    check_neighbours_source,
    compute_cache_neighbours,
    topk_neighbours,
)


def naive_neighbours(x: np.ndarray, top_n: int) -> np.ndarray:
    """For each row, the other rows by decreasing cosine similarity (float64, one at a time)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    out = []
    for i in range(len(x)):
        sims = []
        for j in range(len(x)):
            if j == i or norms[j] == 0:
                continue
            cos = float(x[i] @ x[j]) / (max(norms[i], 1e-12) * norms[j])
            sims.append((-cos, j))
        out.append([j for _, j in sorted(sims)[:top_n]])
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("n,d,top_n,chunk", [(97, 8, 10, 16), (40, 3, 39, 7), (12, 5, 1, 256)])
def test_topk_matches_naive(n: int, d: int, top_n: int, chunk: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    got = topk_neighbours(x, top_n, chunk=chunk)
    assert got.dtype == np.int32 and got.shape == (n, top_n)
    np.testing.assert_array_equal(got, naive_neighbours(x, top_n))


def test_float16_memmap_input_and_scale_invariance(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float16)
    np.save(tmp_path / "e.npy", x)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    scaled = torch.from_numpy(x.astype(np.float32) * np.arange(1, 51, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(topk_neighbours(mm, 5, chunk=8), naive_neighbours(x, 5))
    np.testing.assert_array_equal(topk_neighbours(scaled, 5), naive_neighbours(x, 5))


def test_self_excluded_with_duplicates_and_zero_rows_never_chosen() -> None:
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    x[3] = x[7]  # duplicates: each one's first neighbour is the other, never itself
    x[5] = 0.0  # an unreadable image's row of zeros
    got = topk_neighbours(x, 8, chunk=3)
    assert got[3, 0] == 7 and got[7, 0] == 3
    assert not (got == np.arange(10)[:, None]).any()
    assert not (got == 5).any()
    with pytest.raises(ValueError, match="top_n"):
        topk_neighbours(x, 9)  # only 8 other non-zero rows


CONFIG = """\
name: neighbours-test
data:
  dataset: synthetic
  synthetic_size: 48
  eval_batch_size: 16
  workers: 0
  views: 0
model:
  arch: resnet8
teacher:
  arch: resnet8
  weights: {weights}
  cache_dir: {cache}
  cache_chunk: 20
  cache_eval_view: true
  cache_fields: [embedding]
method:
  name: coss
tracking:
  enabled: false
train:
  progress: false
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cache holding only the eval view of 48 synthetic samples (random resnet8)."""
    from pipeline.models import build_model
    from pipeline.teacher.cache_writer import write_cache

    root = tmp_path_factory.mktemp("nbcache")
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", 10).state_dict()}, root / "t.pt")
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(weights=root / "t.pt", cache=root / "cache"))
    write_cache(load_run_config(cfg), ("embedding",))
    return root / "cache"


def test_cache_neighbours_file_and_info(cache: Path) -> None:
    from pipeline.teacher.cache_format import Manifest

    path = compute_cache_neighbours(cache, top_n=12, chunk=10)
    assert path == neighbours_path(cache.resolve(), 12) and path.name == "neighbours_top12.npy"
    emb = np.load(cache / "eval_embedding.npy")
    lists = load_neighbours(path, num_samples=48, min_cols=12)
    assert lists.dtype == np.int32 and lists.shape == (48, 12)
    # Embeddings of one synthetic class are nearly parallel, so near-ties may order differently
    # in float32: compare the float64 similarities of the chosen neighbours with the naive ones.
    x = emb.astype(np.float64) / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    sims = x @ x.T
    rows = np.arange(48)[:, None]
    naive = naive_neighbours(emb, 12)
    np.testing.assert_allclose(sims[rows, np.asarray(lists)], sims[rows, naive], atol=1e-6)
    assert not (np.asarray(lists) == rows).any()
    assert all(len(set(r)) == 12 for r in np.asarray(lists).tolist())
    info = json.loads(info_path(path).read_text())
    assert info["num_samples"] == 48 and info["top_n"] == 12
    assert info["manifest_id"] == Manifest.load(cache).id


def test_load_refusals(cache: Path, tmp_path: Path) -> None:
    path = compute_cache_neighbours(cache, top_n=6)
    with pytest.raises(ConfigError, match="48 samples"):
        load_neighbours(path, num_samples=50)
    with pytest.raises(ConfigError, match="at least"):
        load_neighbours(path, min_cols=7)
    with pytest.raises(ConfigError, match="launch/neighbours.py"):
        load_neighbours(tmp_path / "absent.npy")
    info = json.loads(info_path(path).read_text())
    info_path(path).write_text(json.dumps({**info, "manifest_id": "another cache version"}))
    load_neighbours(path)  # the data stage checks the array only
    with pytest.raises(ConfigError, match="manifest changed"):
        check_neighbours_source(path)


def test_incomplete_eval_view_is_refused(cache: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.teacher.cache_format import Manifest

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shutil.rmtree(copy / "done")  # no completion markers: the eval view is incomplete
    assert Manifest.load(copy).eval_view
    with pytest.raises(ConfigError, match="incomplete"):
        compute_cache_neighbours(copy, top_n=4)
