"""Training-set selection: data.train_fraction (stratified, seeded, fingerprinted, cache refused)
and data.drop_classes / drop_classes_keep (classes absent from training, few-shot counts)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import AugPlan, build_index, build_train_index, build_train_loader
from pipeline.data.subset import kept_per_class, select_training_samples

# Unequal classes, so "stratified" is tested against per-class rounding, not a global fraction.
COUNTS = [50, 37, 12, 1, 0, 20]


def _labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)])
    return np.random.default_rng(seed).permutation(labels)


def test_fraction_is_stratified_with_half_up_rounding() -> None:
    labels = _labels()
    kept = select_training_samples(labels, 6, 0.3, [], 0, seed=0)
    got = Counter(labels[kept].tolist())
    # round(0.3·n) half up, at least 1 of a class that has any: 15, 11.1→11, 3.6→4, 0.3→1, 0, 6
    assert [got.get(c, 0) for c in range(6)] == [15, 11, 4, 1, 0, 6]
    assert kept_per_class(np.array(COUNTS), 0.3, [], 0).tolist() == [15, 11, 4, 1, 0, 6]
    assert np.all(np.diff(kept) > 0), "positions come back sorted, each once"
    assert select_training_samples(labels, 6, 1.0, [], 0, 0).tolist() == list(range(len(labels)))


def test_fraction_is_deterministic_nested_and_seeded() -> None:
    labels = _labels()
    a = select_training_samples(labels, 6, 0.2, [], 0, seed=7)
    assert np.array_equal(a, select_training_samples(labels, 6, 0.2, [], 0, seed=7))
    other = select_training_samples(labels, 6, 0.2, [], 0, seed=8)
    assert not np.array_equal(a, other) and len(other) == len(a)
    small, large = (set(select_training_samples(labels, 6, f, [], 0, 7).tolist())
                    for f in (0.2, 0.6))
    assert small < large, "20 % of a seed lies within its 60 %"


def test_drop_classes_with_and_without_kept_samples() -> None:
    labels = _labels()
    zero = Counter(labels[select_training_samples(labels, 6, 1.0, [0, 2], 0, 0)].tolist())
    assert zero == {1: 37, 3: 1, 5: 20}
    few = Counter(labels[select_training_samples(labels, 6, 1.0, [0, 2], 5, 0)].tolist())
    assert few == {0: 5, 1: 37, 2: 5, 3: 1, 5: 20}
    # keep is capped by what the fraction leaves: 0.5·12 = 6 of class 2, so keep 10 gives 6
    both = Counter(labels[select_training_samples(labels, 6, 0.5, [2], 10, 0)].tolist())
    assert both[2] == 6 and both[0] == 25


def _spec(tmp_path: Path, *overrides: str):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: subset-test\ndata: {dataset: synthetic, synthetic_size: 60, "
                   "batch_size: 8, eval_batch_size: 16, workers: 0}\nmodel: {arch: resnet8}\n"
                   "tracking: {enabled: false}\n")
    return load_run_config(cfg, list(overrides))


def test_train_index_subset_and_fingerprint(tmp_path: Path) -> None:
    full = build_train_index(_spec(tmp_path).data)
    assert full.fingerprint == build_index(_spec(tmp_path).data, "train").fingerprint
    spec = _spec(tmp_path, "data.train_fraction=0.5")
    sub = build_train_index(spec.data)
    assert np.bincount(sub.labels).tolist() == [3] * 10  # half of the 6 of each class
    assert sub.selection and "train_fraction=0.5" in sub.where
    picked = select_training_samples(full.labels, 10, 0.5, [], 0, 0)
    assert sub.array is not None and full.array is not None
    assert np.array_equal(sub.array, full.array[picked])
    assert np.array_equal(sub.labels, full.labels[picked])
    fingerprints = {full.fingerprint, sub.fingerprint,
                    build_train_index(_spec(tmp_path, "data.train_fraction=0.5",
                                            "data.subset_seed=1").data).fingerprint,
                    build_train_index(_spec(tmp_path, "data.train_fraction=0.6").data).fingerprint}
    assert len(fingerprints) == 4
    assert build_train_index(spec.data).fingerprint == sub.fingerprint
    # the evaluation splits are never subset
    assert len(build_index(spec.data, "val")) == 60


def test_teacher_cache_of_the_full_set_is_refused(tmp_path: Path) -> None:
    from pipeline.models import build_model
    from pipeline.teacher.cache_writer import write_cache
    from pipeline.teacher.cached import open_cached_teacher

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 10).state_dict(), weights)
    cache = tmp_path / "cache"
    teacher = ("teacher.arch=resnet8", f"teacher.weights={weights}", f"teacher.cache_dir={cache}",
               "method.name=kd", "data.views=1", "optim.epochs=1", "train.progress=false")
    write_cache(_spec(tmp_path, *teacher), ("logits",))
    open_cached_teacher(_spec(tmp_path, *teacher), ("logits",), 10)  # the full set: accepted
    for selection in ("data.train_fraction=0.5", "data.drop_classes=[4]"):
        with pytest.raises(ConfigError, match=r"dataset.fingerprint.*cache has .*this run has"):
            open_cached_teacher(_spec(tmp_path, *teacher, selection), ("logits",), 10)


def test_dropped_classes_never_reach_a_training_batch(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "data.drop_classes=[2,7]", "data.drop_classes_keep=0")
    index = build_train_index(spec.data)
    seen: Counter[int] = Counter()
    for epoch in range(3):
        loader = build_train_loader(index, spec.data, AugPlan.from_spec(spec.data, 0), epoch, 0,
                                    0, 1)
        for batch in loader:
            seen.update(batch.labels.tolist())
    assert seen and not {2, 7} & set(seen)
    few = build_train_index(_spec(tmp_path, "data.drop_classes=[2,7]",
                                  "data.drop_classes_keep=2").data)
    assert np.bincount(few.labels, minlength=10).tolist() == [6, 6, 2, 6, 6, 6, 6, 2, 6, 6]
    assert len(build_index(spec.data, "val")) == 60  # evaluation keeps every class


@pytest.mark.parametrize(("override", "message"), [
    ("data.train_fraction=0", r"data.train_fraction: expected a fraction in \(0, 1\]"),
    ("data.train_fraction=1.2", r"data.train_fraction: expected a fraction in \(0, 1\]"),
    ("data.drop_classes=[1,1]", "data.drop_classes: expected distinct class ids"),
    ("data.drop_classes=[-1]", "data.drop_classes: expected class ids >= 0"),
    ("data.drop_classes_keep=3", "data.drop_classes_keep: expected data.drop_classes"),
])
def test_bad_selection_keys_are_config_errors(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(tmp_path, override)


def test_unknown_class_id_names_the_key_and_the_class_count(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"drop_classes: expected class ids in 0..9 .*\[12\]"):
        build_train_index(_spec(tmp_path, "data.drop_classes=[12]").data)
    spec = DataSpec(dataset="synthetic", synthetic_size=10, drop_classes=list(range(10)))
    with pytest.raises(ConfigError, match="leaves no sample"):
        build_train_index(spec)
