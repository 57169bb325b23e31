"""The teacher cache: online vs cached KD, multi-process and resumed writes, verify, refusals.

One tiny setup for the whole module: 64 synthetic 32×32 images, K = 2 views plus the eval view,
a resnet14 teacher saved in tmp, chunks of 24 samples (3 per view, the last one short).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.catalog import load_run_config
from pipeline.config import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.data import AugPlan, build_index
from pipeline.data.device import to_device
from pipeline.data.loader import build_train_loader
from pipeline.distill.losses import kd_loss
from pipeline.teacher.cache_format import (
    MANIFEST,
    Manifest,
    Unit,
    marker_path,
    open_arrays,
    verify_cache,
)
from pipeline.teacher.cache_writer import write_cache
from pipeline.teacher.cached import open_cached_teacher
from pipeline.teacher.online import OnlineTeacher, build_teacher_model

FIELDS = ("logits", "embedding")
CONFIG = """\
name: cache-test
data:
  dataset: synthetic
  synthetic_size: 64
  augment: cifar
  image_size: 32
  batch_size: 16
  eval_batch_size: 16
  workers: 0
  views: 2
model:
  arch: resnet8
teacher:
  arch: resnet14
  weights: {weights}
  cache_dir: {cache}
  cache_chunk: 24
  cache_eval_view: true
method:
  name: kd
  T: 4
optim:
  epochs: 2
tracking:
  enabled: false
train:
  progress: false
"""


@dataclass
class Setup:
    root: Path
    cfg: Path
    weights: Path
    ref: Path  # the reference cache, written once by one uninterrupted process

    def spec(self, *overrides: str, cache: Path | None = None) -> RunSpec:
        extra = [f"teacher.cache_dir={cache}"] if cache is not None else []
        return load_run_config(self.cfg, [*overrides, *extra])


def _save_teacher(path: Path, seed: int) -> None:
    from pipeline.models import build_model

    torch.manual_seed(seed)
    torch.save({"model": build_model("resnet14", 10).state_dict()}, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("cache")
    weights = root / "teacher.pt"
    _save_teacher(weights, 0)
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(weights=weights, cache=root / "ref"))
    s = Setup(root, cfg, weights, root / "ref")
    write_cache(s.spec(), FIELDS)
    return s


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    m = Manifest.load(cache)
    return {k: np.array(v) for k, v in open_arrays(cache, m).items()}


def _assert_same_cache(a: Path, b: Path) -> None:
    assert (a / MANIFEST).read_text() == (b / MANIFEST).read_text()
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), f"array {k} differs"
    m = Manifest.load(a)
    for unit in m.units():
        ma = json.loads(marker_path(a, unit).read_text())
        mb = json.loads(marker_path(b, unit).read_text())
        assert ma["sha256"] == mb["sha256"], unit.key


def test_reference_cache_is_complete(setup: Setup) -> None:
    m = Manifest.load(setup.ref)
    assert m.views == 2 and m.eval_view and m.chunks_per_view == 3
    assert sorted(m.arrays) == ["embedding", "eval_embedding", "eval_logits", "logits"]
    assert _arrays(setup.ref)["logits"].shape == (2 * 64, 10)
    report = verify_cache(setup.ref)
    assert report.ok and report.total == 9, report.summary()


def test_kd_loss_online_equals_cached(setup: Setup) -> None:
    """Same batches, same student logits: KD from the online teacher and from the cache agree."""
    spec = setup.spec()
    index = build_index(spec.data, "train")
    model, _ = build_teacher_model(spec.teacher, 10)
    online = OnlineTeacher(model, FIELDS)
    cached = open_cached_teacher(spec, FIELDS, 10, index=index).to("cpu")
    assert cached.embedding_dim == model.embedding_dim
    plan = AugPlan.from_spec(spec.data, spec.seed)
    torch.manual_seed(1)
    for epoch in range(2):  # both views
        for raw in build_train_loader(index, spec.data, plan, epoch, spec.seed, 0, 1):
            batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
            a, b = online(batch, batch.images), cached(batch, batch.images)
            assert b.logits.dtype == torch.float32 and b.logits.shape == a.logits.shape
            student = torch.randn_like(a.logits) * 3
            ka, kb = kd_loss(student, a.logits, 4.0), kd_loss(student, b.logits, 4.0)
            torch.testing.assert_close(kb, ka, rtol=2e-3, atol=1e-4)
            torch.testing.assert_close(b.logits, a.logits, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(b.embedding, a.embedding, rtol=2e-3, atol=2e-3)


def test_trainer_builds_the_cached_source(setup: Setup) -> None:
    from pipeline.train.build import build_parts

    parts = build_parts(setup.spec("teacher.source=cached"))
    assert type(parts.teacher).__name__ == "CachedTeacher"
    assert parts.teacher.to("cpu") is parts.teacher


def test_two_processes_write_the_same_cache(setup: Setup, tmp_path: Path) -> None:
    spec = setup.spec(cache=tmp_path / "c")
    r0 = write_cache(spec, FIELDS, process_index=0, num_processes=2, progress=False)
    r1 = write_cache(spec, FIELDS, process_index=1, num_processes=2, progress=False)
    assert (r0.units_written, r1.units_written) == (5, 4)
    m = Manifest.load(tmp_path / "c")
    for unit in m.units():  # chunk c of view v (eval = view K) went to (v·chunks + c) mod 2
        marker = json.loads(marker_path(tmp_path / "c", unit).read_text())
        assert marker["process_index"] == m.owner(unit, 2)
    _assert_same_cache(setup.ref, tmp_path / "c")


class Interrupt(Exception):
    pass


def test_interrupted_pass_resumes_to_the_same_cache(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    spec = setup.spec(cache=cache)
    batches = []

    def stop_mid_chunk(unit: Unit, rows_done: int) -> None:
        batches.append(unit)
        if len(batches) == 3:  # chunk v0_c0 done (16 + 8 rows), v0_c1 half written
            raise Interrupt

    with pytest.raises(Interrupt):
        write_cache(spec, FIELDS, after_batch=stop_mid_chunk)
    m = Manifest.load(cache)
    assert marker_path(cache, Unit(0, 0)).exists()
    assert not marker_path(cache, Unit(0, 1)).exists()
    with pytest.raises(ConfigError, match="incomplete.*v0_c1"):
        open_cached_teacher(spec, FIELDS, 10)
    arrays = open_arrays(cache, m, "r+")  # garbage in every row not marked complete
    lo = m.row_range(Unit(0, 1))[0]
    arrays["logits"][lo:] = 7.0
    arrays["logits"].flush()
    report = write_cache(spec, FIELDS)
    assert (report.units_skipped, report.units_written) == (1, 8)
    _assert_same_cache(setup.ref, cache)


def test_verify_finds_flipped_byte_and_missing_marker(setup: Setup, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from launch.cache_teacher import main

    cache = tmp_path / "c"
    shutil.copytree(setup.ref, cache)
    m = Manifest.load(cache)
    arr = np.load(cache / "logits.npy", mmap_mode="r")
    header = arr.offset
    row = m.row_range(Unit(1, 2))[0] + 3  # a row of view 1, chunk 2
    with open(cache / "logits.npy", "r+b") as f:
        f.seek(header + row * 10 * 2 + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    marker_path(cache, Unit(-1, 0)).unlink()
    report = verify_cache(cache)
    assert [u.key for u, names in report.corrupt] == ["v1_c2"]
    assert report.corrupt[0][1] == ["logits"]
    assert [u.key for u in report.missing] == ["eval_c0"]
    spec = setup.spec(cache=cache)
    open_cached_teacher(spec, FIELDS, 10)  # views 0 and 1 are all marked (checksums: --verify)
    with pytest.raises(ConfigError, match=r"1 chunk\(s\) of views \[0, 1, -1\].*\(eval_c0\)"):
        open_cached_teacher(spec, FIELDS, 10, eval_view=True)
    rc = main(["--cfg", str(setup.cfg), "--set", f"teacher.cache_dir={cache}", "--verify"])
    err = capsys.readouterr().err
    assert rc == 1 and "v1_c2" in err and "eval_c0" in err and "logits" in err
    rc = main(["--cfg", str(setup.cfg), "--verify"])
    assert rc == 0, capsys.readouterr()


def test_refuses_another_teacher(setup: Setup) -> None:
    other = setup.root / "other_teacher.pt"
    _save_teacher(other, 1)
    want = Manifest.load(setup.ref).teacher["sha256"]
    with pytest.raises(ConfigError, match=rf"teacher.sha256.*{want}") as err:
        open_cached_teacher(setup.spec(f"teacher.weights={other}"), FIELDS, 10)
    assert "cache has" in str(err.value) and "this run has" in str(err.value)
    with pytest.raises(ConfigError, match="teacher.arch: cache has 'resnet14', this run has"):
        open_cached_teacher(setup.spec("teacher.arch=resnet8", f"teacher.weights={other}"),
                            FIELDS, 10)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.synthetic_size=48", "dataset.fingerprint"),
        ("seed=3", "plan.seed"),
        ("data.augment=none", "plan.kind"),
        ("data.views=3", "data.views"),
        ("data.mean=[0.5,0.5,0.5]", "data.mean"),
        ("method.T=2", None),  # a full-logit cache serves any temperature
    ],
)
def test_refuses_another_dataset_plan_or_k(setup: Setup, override: str, field: str | None) -> None:
    spec = setup.spec(override)
    if field is None:
        open_cached_teacher(spec, FIELDS, 10)
        return
    with pytest.raises(ConfigError, match=rf"{field}[^:]*: cache has .*, this run has"):
        open_cached_teacher(spec, FIELDS, 10)


def test_refuses_missing_field_and_infinite_views(setup: Setup) -> None:
    with pytest.raises(ConfigError, match=r"reads teacher field\(s\) \['feats'\]"):
        open_cached_teacher(setup.spec(), ("logits", "feats"), 10)
    with pytest.raises(ConfigError, match="data.views"):
        open_cached_teacher(setup.spec("data.views=0"), FIELDS, 10)
    with pytest.raises(ConfigError, match="expected a teacher cache"):
        open_cached_teacher(setup.spec(cache=setup.root / "nowhere"), FIELDS, 10)


def test_writer_refuses_a_directory_of_another_cache(setup: Setup, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    shutil.copytree(setup.ref, cache)
    with pytest.raises(ConfigError, match=r"another configuration \(chunk: cache has 24"):
        write_cache(setup.spec("teacher.cache_chunk=32", cache=cache), FIELDS)


def test_cached_teacher_reads_eval_view_and_refuses_unchecked_views(setup: Setup) -> None:
    t = open_cached_teacher(setup.spec("optim.epochs=1"), FIELDS, 10)
    raw = _arrays(setup.ref)
    out = t.lookup(np.array([5, 0]), np.array([0, 0]))
    assert torch.equal(out.logits, torch.from_numpy(raw["logits"][[5, 0]]).float())
    with pytest.raises(ValueError, match=r"views checked at start-up \[0\], found view\(s\) \[1\]"):
        t.lookup(np.array([1]), np.array([1]))
    both = open_cached_teacher(setup.spec(), FIELDS, 10, eval_view=True)
    out = both.lookup(np.array([3, 3]), np.array([-1, 1]))
    assert torch.equal(out.embedding[0], torch.from_numpy(raw["eval_embedding"][3]).float())
    assert torch.equal(out.embedding[1], torch.from_numpy(raw["embedding"][64 + 3]).float())


@pytest.mark.slow
def test_accelerate_two_process_pass_equals_one(setup: Setup, tmp_path: Path) -> None:
    """A real 2-process gloo run of the launcher writes the same cache as one process."""
    import subprocess

    from tests.conftest import PY, ROOT, run_env

    cache = tmp_path / "c"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "launch/cache_teacher.py"), "--cfg", str(setup.cfg),
           "--set", f"teacher.cache_dir={cache}",
           "--set", "teacher.cache_fields=[embedding,logits]"]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 of 9 chunks incomplete" in out.stdout, out.stdout
    owners = {json.loads(p.read_text())["process_index"] for p in (cache / "done").glob("*.json")}
    assert owners == {0, 1}
    _assert_same_cache(setup.ref, cache)


def test_stage_maps_are_cached_with_their_flavour(setup: Setup, tmp_path: Path) -> None:
    spec = setup.spec("data.synthetic_size=16", "data.views=1", "teacher.cache_eval_view=false",
                      "teacher.cache_fields=[feats]", cache=tmp_path / "c")
    write_cache(spec, ("feats",), stages=(2, -1), preact=True)  # resnet20: stages 2 and 3
    manifest = Manifest.load(tmp_path / "c")
    assert manifest.stages == [2, 3]
    assert sorted(n for n in manifest.arrays if n.startswith("feats_")) == ["feats_2", "feats_3"]
    model, _ = build_teacher_model(spec.teacher, 10)
    online = OnlineTeacher(model, (), stages=(2, 3), preact=True)
    cached = open_cached_teacher(spec, ("feats",), 10, preact=True, stages=(2, 3))
    index = build_index(spec.data, "train")
    plan = AugPlan.from_spec(spec.data, spec.seed)
    raw = next(iter(build_train_loader(index, spec.data, plan, 0, spec.seed, 0, 1)))
    batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
    a, b = online(batch, batch.images).feats, cached(raw, batch.images).feats
    assert a is not None and b is not None and sorted(a) == sorted(b) == [2, 3]
    for s in a:
        torch.testing.assert_close(b[s], a[s], rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError, match="teacher.preact: cache has True, this run has False"):
        open_cached_teacher(spec, ("feats",), 10, preact=False, stages=(2, 3))
    with pytest.raises(ConfigError, match=r"stage maps \[1\], found a cache .* holding stages"):
        open_cached_teacher(spec, ("feats",), 10, preact=True, stages=(1,))
    with pytest.raises(ConfigError, match=r"another configuration \(fields: cache has \['feats'\]"):
        write_cache(setup.spec("data.synthetic_size=16", "data.views=1",
                               "teacher.cache_eval_view=false", cache=tmp_path / "c"), FIELDS)
