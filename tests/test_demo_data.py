"""The bundled demo data: counts, measured background bias, pairing, determinism, idempotence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataSpec
from pipeline.data import build_index
from pipeline.data.demo import SPLITS, _matches, background_of, read_manifest, write_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    manifest, written = write_demo(out, rho=0.8, seed=0)
    assert written
    return out, manifest


def _index(out: Path, split: str):
    return build_index(DataSpec(dataset="demo", root=str(out)), split)


def test_counts_and_images(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    assert manifest["counts"] == {"train": 4000, "test_biased": 1000, "test_unbiased": 1000}
    for split, n in manifest["counts"].items():
        index = _index(out, split)
        assert len(index) == n and index.classes == [str(c) for c in range(10)]
        assert index.fingerprint == manifest["fingerprints"][split]
        assert np.bincount(index.labels, minlength=10).min() > 0.05 * n
        for i in (0, n // 2, n - 1):
            with Image.open(index.path(i)) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    assert read_manifest(out) == manifest


def test_measured_bias_matches_rho_and_the_pixels(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    bias = manifest["bias"]
    assert abs(bias["train"] - 0.8) < 0.03 and abs(bias["test_biased"] - 0.8) < 0.05
    assert abs(bias["test_unbiased"] - 0.1) < 0.04
    for split in SPLITS:  # the background colour read back from the JPEGs agrees
        index = _index(out, split)
        every = 4 if split == "train" else 1
        found = np.array([background_of(index.load(i)) for i in range(0, len(index), every)])
        measured = np.mean(found == index.labels[::every])
        assert abs(measured - bias[split]) < (0.03 if every > 1 else 0.005), split


def test_test_splits_are_paired(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    biased, unbiased = _index(out, "test_biased"), _index(out, "test_unbiased")
    names = [f.decode().split("/", 1)[1] for f in biased.files]
    assert names == [f.decode().split("/", 1)[1] for f in unbiased.files]
    train_names = {f.decode().rsplit("/", 1)[1] for f in _index(out, "train").files}
    assert not train_names & {n.rsplit("/", 1)[1] for n in names}  # test digits are held out
    a = np.asarray(biased.load(10), dtype=int)
    b = np.asarray(unbiased.load(10), dtype=int)
    centre = a[14:18, 14:18].sum(-1) > 600  # bright foreground pixels of the digit
    if centre.any():
        assert np.abs(a[14:18, 14:18][centre] - b[14:18, 14:18][centre]).max() < 40


def test_deterministic_idempotent_and_forced(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = demo
    again, written = write_demo(out, rho=0.8, seed=0)
    assert not written and again == manifest
    assert not _matches(manifest, out, 0.5, 0) and not _matches(manifest, out, 0.8, 1)
    other = tmp_path / "copy"
    (other / "train" / "stale").mkdir(parents=True)  # a folder that is not ours
    with pytest.raises(ConfigError, match="--force"):
        write_demo(other)
    copy, written = write_demo(other, rho=0.8, seed=0, force=True)
    assert written and copy["fingerprints"] == manifest["fingerprints"]
    assert not (other / "train" / "stale").exists()
    for split in SPLITS:
        for f in _index(out, split).files:
            rel = f.decode()
            assert (out / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_cli(demo: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = demo
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "tools/make_demo_data.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--out", str(out), "--rho", "0.8", "--seed", "0"]) == 0
    assert "up to date" in capsys.readouterr().out
    (tmp_path / "mine" / "train").mkdir(parents=True)
    assert tool.main(["--out", str(tmp_path / "mine")]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "x"), "--rho", "1.5"])
    assert not (tmp_path / "x").exists()
