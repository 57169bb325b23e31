"""CoSS batch order: anchors + neighbours from the stored lists, each anchor once per epoch across
processes, determinism, k = 0 is train_order, uniform draws; the loader path; and label-free
training (shuffled labels, identical weights)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, build_index, build_train_loader
from pipeline.data.coss_sampler import CoSSOrder, dry_run_sampler, order_function
from pipeline.data.loader import train_order


def random_lists(n: int, top: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.delete(np.arange(n), i))[:top] for i in range(n)])


def groups(order: np.ndarray, k: int) -> np.ndarray:
    """(steps·anchors, 1 + k): each anchor with its neighbours."""
    return order.reshape(-1, 1 + k)


def test_anchor_then_k_distinct_neighbours_from_top_m() -> None:
    n, k, m = 60, 3, 5
    lists = random_lists(n, 10)
    order = CoSSOrder(lists, k, m)(n, 8, seed=3, epoch=0, process_index=0, num_processes=1)
    assert order.shape == (60 // 2, 8) and order.dtype == np.int64
    for anchor, *nbrs in groups(order, k):
        assert len(set(nbrs)) == k and set(nbrs) <= set(lists[anchor, :m].tolist())


@pytest.mark.parametrize("n", [60, 63])
def test_each_anchor_once_per_epoch_across_two_processes(n: int) -> None:
    k, batch, procs = 3, 8, 2  # 2 anchors per process and step
    sampler = CoSSOrder(random_lists(n, 6), k, 4)
    parts = [sampler(n, batch, 5, 1, p, procs) for p in range(procs)]
    assert parts[0].shape == parts[1].shape == (n // (procs * 2), batch)  # equal step counts
    anchors = np.concatenate([groups(o, k)[:, 0] for o in parts])
    counts = Counter(anchors.tolist())
    assert max(counts.values()) == 1
    assert len(counts) == n - n % (procs * 2)  # drop-last, as train_order
    # The anchors are train_order's split with batch = anchors per process.
    for p in range(procs):
        expect = train_order(n, 2, 5, 1, p, procs).ravel()
        np.testing.assert_array_equal(groups(parts[p], k)[:, 0], expect)


def test_deterministic_and_epoch_dependent() -> None:
    sampler = CoSSOrder(random_lists(40, 8), 2, 6)
    a = sampler(40, 6, 7, 2, 0, 1)
    np.testing.assert_array_equal(a, CoSSOrder(random_lists(40, 8), 2, 6)(40, 6, 7, 2, 0, 1))
    assert not np.array_equal(a, sampler(40, 6, 7, 3, 0, 1))
    assert not np.array_equal(a, sampler(40, 6, 8, 2, 0, 1))


def test_neighbours_of_an_anchor_do_not_depend_on_process_count() -> None:
    n, k = 48, 2
    sampler = CoSSOrder(random_lists(n, 7), k, 5)
    one = {g[0]: tuple(g[1:]) for g in groups(sampler(n, 6, 1, 0, 0, 1), k).tolist()}
    two = {g[0]: tuple(g[1:]) for p in range(2)
           for g in groups(sampler(n, 3, 1, 0, p, 2), k).tolist()}
    assert one == two


def test_k_zero_is_train_order() -> None:
    sampler = CoSSOrder(None, 0, 31)
    for p in range(2):
        np.testing.assert_array_equal(sampler(50, 8, 4, 1, p, 2), train_order(50, 8, 4, 1, p, 2))
    whole = CoSSOrder(None, 0, 31)(48, 8, 4, 1, 0, 1)
    assert sorted(whole.ravel().tolist()) == list(range(48))  # a plain permutation


def test_k_equal_m_takes_the_first_k() -> None:
    lists = random_lists(30, 6)
    order = CoSSOrder(lists, 3, 3)(30, 8, 0, 0, 0, 1)
    for anchor, *nbrs in groups(order, 3):
        assert nbrs == lists[anchor, :3].tolist()


def test_draws_are_uniform_over_the_top_m() -> None:
    n, k, m, epochs = 20, 2, 4, 300
    lists = np.tile(np.arange(1, m + 1), (n, 1))  # column c holds the value c + 1
    sampler = CoSSOrder(lists, k, m)
    picks = Counter()
    for e in range(epochs):
        picks.update(groups(sampler(n, 6, 0, e, 0, 1), k)[:, 1:].ravel().tolist())
    total = sum(picks.values())
    for c in range(1, m + 1):  # each candidate is 1/m of the 12000 picks (σ ≈ 0.004)
        assert abs(picks[c] / total - 1 / m) < 0.02


def test_errors() -> None:
    lists = random_lists(20, 5)
    with pytest.raises(ConfigError, match="multiple of"):
        CoSSOrder(lists, 3, 5)(20, 6, 0, 0, 0, 1)
    with pytest.raises(ConfigError, match="19"):
        CoSSOrder(lists, 1, 5)(19, 4, 0, 0, 0, 1)
    with pytest.raises(ConfigError, match="coss_k"):
        CoSSOrder(lists, 6, 5)
    with pytest.raises(ConfigError, match="coss_m"):
        CoSSOrder(lists, 2, 8)
    with pytest.raises(ConfigError, match="required"):
        CoSSOrder(None, 2, 5)


def _spec(tmp_path: Path, n: int = 32, k: int = 1) -> DataSpec:
    path = tmp_path / "nb.npy"
    np.save(path, random_lists(n, 4).astype(np.int32))
    return DataSpec(dataset="synthetic", synthetic_size=n, batch_size=8, workers=0,
                    sampler="coss", coss_k=k, coss_m=3, neighbours=str(path))


def test_order_function_and_train_loader(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert order_function(DataSpec()) is train_order
    expected = CoSSOrder(np.load(spec.neighbours), 1, 3)(32, 8, 9, 0, 1, 2)
    np.testing.assert_array_equal(order_function(spec, 32)(32, 8, 9, 0, 1, 2), expected)
    index = build_index(spec, "train")
    loader = build_train_loader(index, spec, AugPlan.from_spec(spec, 9), 0, 9, 1, 2)
    np.testing.assert_array_equal(loader.indices(), expected)
    first = next(iter(loader))
    assert first.index.tolist() == expected[0].tolist() and len(first) == 8


def test_dry_run_sampler(tmp_path: Path) -> None:
    spec = DataSpec(synthetic_size=8, sampler="coss", coss_k=15, coss_m=31,
                    neighbours="absent.npy")
    dry_run_sampler(spec, tmp_path)
    assert (spec.coss_k, spec.coss_m, spec.batch_size) == (1, 2, 2)
    order = order_function(spec, 8)(8, 2, 0, 0, 0, 1)
    assert order.shape == (8, 2) and (order[:, 0] != order[:, 1]).all()


def _train_coss(spec: DataSpec, label_seed: int | None, method: str = "coss") -> dict:
    """Three SGD steps of resnet8 distilled from a fixed random resnet8 by ``method`` over the
    CoSS loader; ``label_seed`` shuffles the training labels first."""
    from pipeline.data.device import to_device
    from pipeline.distill.base import METHODS, MethodContext
    from pipeline.models import build_model
    from pipeline.teacher.online import OnlineTeacher
    from pipeline.train.distiller import Distiller

    index = build_index(spec, "train")
    if label_seed is not None:
        index.labels = np.random.default_rng(label_seed).permutation(index.labels)
    torch.manual_seed(0)
    teacher = OnlineTeacher(build_model("resnet8", 10), ("embedding", "logits"))
    student = build_model("resnet8", 10)
    cls = METHODS.get(method)
    ctx = MethodContext(num_classes=10, student_dim=64, teacher_dim=64, epochs=1,
                        steps_per_epoch=3)
    model = Distiller(student, cls(cls.Options(), ctx))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = build_train_loader(index, spec, AugPlan.from_spec(spec, 0), 0, 0, 0, 1)
    for step, raw in enumerate(loader):
        if step == 3:
            break
        batch = to_device(raw, "cpu", spec.mean, spec.std)
        losses = model(batch.images, teacher(raw, batch.images), batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return {k: v.clone() for k, v in student.state_dict().items()}


def test_coss_training_ignores_labels(tmp_path: Path) -> None:
    spec = _spec(tmp_path, n=48, k=1)
    ref = _train_coss(spec, None)
    shuffled = _train_coss(spec, 1)
    start = _train_coss_init()
    assert any(not torch.equal(ref[k], start[k]) for k in ref), "training changed nothing"
    assert all(torch.equal(ref[k], shuffled[k]) for k in ref)
    # The check has teeth: a label-reading loss on the same batches does change.
    kd_ref, kd_shuffled = _train_coss(spec, None, "kd"), _train_coss(spec, 1, "kd")
    assert any(not torch.equal(kd_ref[k], kd_shuffled[k]) for k in kd_ref)


def _train_coss_init() -> dict:
    from pipeline.models import build_model

    torch.manual_seed(0)
    build_model("resnet8", 10)  # the teacher is built first from the same seed
    return build_model("resnet8", 10).state_dict()
