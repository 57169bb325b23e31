"""Run plots (pipeline/evaluate/plots.py): the numbers behind them on hand-made inputs, the files
of a finished demo run, and the per-epoch history they read (pipeline/train/run_end.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate.loop import SplitOutputs
from pipeline.evaluate.metrics import ece
from pipeline.evaluate.plots import (
    confusion_matrix,
    per_class_accuracy,
    predictions,
    reliability_bins,
    write_plots,
)
from pipeline.train.run_end import EpochMeans
from tests.conftest import PY, ROOT, run_env

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


def test_reliability_bins_by_hand() -> None:
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: 0.5 lies in the second, 1.0 in the last.
    conf = torch.tensor([0.05, 0.1, 0.5, 0.55, 0.95, 1.0])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    bins = reliability_bins(conf, correct, n_bins=4)
    np.testing.assert_array_equal(bins["count"], [2, 1, 1, 2])
    np.testing.assert_allclose(bins["confidence"], [0.075, 0.5, 0.55, 0.975])
    np.testing.assert_allclose(bins["accuracy"], [0.5, 1.0, 0.0, 1.0])
    empty = reliability_bins(torch.tensor([0.9]), torch.tensor([1.0]), n_bins=4)
    assert np.isnan(empty["accuracy"][0]) and empty["count"].tolist() == [0, 0, 0, 1]


def test_reliability_gaps_sum_to_the_logged_ece() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    conf, pred = predictions(logits)
    bins = reliability_bins(conf, (pred == labels).double())
    share = bins["count"] / 500
    from_bins = np.nansum(share * np.abs(bins["accuracy"] - bins["confidence"]))
    assert from_bins == pytest.approx(ece(logits, labels), abs=1e-12)


def test_per_class_accuracy_and_confusion_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 0])
    acc = per_class_accuracy(pred, labels, 4)
    np.testing.assert_allclose(acc[:3], [200 / 3, 100.0, 0.0])
    assert np.isnan(acc[3])  # no sample of class 3
    cm = confusion_matrix(pred, labels, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])


def test_epoch_means_weight_each_logging_window_by_its_steps() -> None:
    m = EpochMeans()
    m.add({"loss": 2.0, "ce": 1.0}, 3)  # 3 steps averaging 2.0
    m.add({"loss": 4.0, "ce": 1.0}, 1)
    assert m.pop() == {"train/loss": 2.5, "train/ce": 1.0}
    assert m.pop() == {}


def _outputs(classes: int, n: int = 300, seed: int = 0) -> SplitOutputs:
    g = torch.Generator().manual_seed(seed)
    return SplitOutputs(torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,),
                        generator=g), {"student": torch.rand(n, generator=g) * 4,
                                       "teacher": torch.rand(n, generator=g) * 9})


def test_write_plots_files_and_the_confusion_limit(tmp_path: Path) -> None:
    history = [{"epoch": e, "train/loss": 3.0 / e, "train/kd": 1.0 / e, "a/top1": 10.0 * e}
               for e in (1, 2, 3)]
    files = write_plots(tmp_path / "p10", {"a": _outputs(10), "b": _outputs(10, seed=1)},
                        [f"c{i}" for i in range(10)], history)
    assert sorted(f.name for f in files) == sorted([
        "reliability_a.png", "reliability_b.png", "confusion_a.png", "confusion_b.png",
        "feature_norms_a.png", "feature_norms_b.png", "per_class_accuracy.png",
        "training_curves.png"])
    assert all(_is_png(f) for f in files)
    many = write_plots(tmp_path / "p25", {"a": _outputs(25)}, [str(i) for i in range(25)])
    assert sorted(f.name for f in many) == ["feature_norms_a.png", "per_class_accuracy.png",
                                            "reliability_a.png"]


def test_plots_leave_pyplot_alone(tmp_path: Path) -> None:
    """Figures go straight to the Agg canvas: pyplot (global state, a GUI backend) is never
    imported, even with an interactive backend asked for."""
    code = ("import sys, torch; from pathlib import Path;"
            "from pipeline.evaluate.plots import write_plots;"
            "from pipeline.evaluate.loop import SplitOutputs;"
            "o = SplitOutputs(torch.randn(50, 3), torch.randint(0, 3, (50,)));"
            f"write_plots(Path({str(tmp_path)!r}), {{'s': o}}, ['a', 'b', 'c']);"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, env=run_env(MPLBACKEND="TkAgg"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _is_png(tmp_path / "reliability_s.png")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_model("resnet8", 10).state_dict(), path)
    return path


def test_finished_cid_run_draws_every_plot(demo_root: Path, teacher_ckpt: Path,
                                           tmp_path: Path) -> None:
    """A CID demo run: every plot file, the history they read, and the feature norms (student
    and teacher) equal to the networks' own embeddings on the split."""
    from pipeline.catalog import load_run_config
    from pipeline.data import build_eval_loader, to_device
    from pipeline.models import build_model
    from pipeline.train.trainer import Trainer

    run_dir = tmp_path / "run"
    spec = load_run_config(ROOT / "configs/demo/cid.yaml", [
        f"data.root={demo_root}", "teacher.arch=resnet8", f"teacher.weights={teacher_ckpt}",
        "optim.epochs=2", "optim.milestones=[]", "method.warmup_epochs=1",
        "train.max_steps_per_epoch=3", "train.log_every_steps=2", "train.progress=false",
        "tracking.enabled=false", "data.eval_splits=[test_unbiased,test_biased]",
        f"run_dir={run_dir}"])
    trainer = Trainer(spec)
    trainer.fit()
    plots = run_dir / "plots"
    names = {f"{kind}_{split}.png" for kind in ("reliability", "confusion", "feature_norms")
             for split in ("test_unbiased", "test_biased")}
    names |= {"per_class_accuracy.png", "training_curves.png"}
    assert {p.name for p in plots.iterdir()} == names
    assert all(_is_png(plots / n) for n in names)

    rows = json.loads((run_dir / "epochs.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "train/intervention_ce" in rows[-1] and "test_unbiased/top1" in rows[-1]
    for r in rows:  # the loss is the sum of the terms at every step, so also in the means
        terms = [v for k, v in r.items() if k.startswith("train/") and k != "train/loss"]
        assert terms and r["train/loss"] == pytest.approx(sum(terms), rel=1e-5)
    last = json.loads((run_dir / "metrics.json").read_text())
    assert last["last"]["test_unbiased/top1"] == rows[-1]["test_unbiased/top1"]
    assert "plots_s" in last["end_costs"]

    out = trainer.final_outputs["test_unbiased"]
    index = trainer.parts.eval_indices["test_unbiased"]
    teacher = build_model("resnet8", 10)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    student = trainer.parts.student.eval()
    norms: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    with torch.no_grad():
        for raw in build_eval_loader(index, spec.data, 0, 1):
            x = to_device(raw, torch.device("cpu"), spec.data.mean, spec.data.std).images
            norms["student"].append(student(x).embedding.norm(dim=1))
            norms["teacher"].append(teacher.eval()(x).embedding.norm(dim=1))
    for name, parts in norms.items():
        torch.testing.assert_close(out.values[name], torch.cat(parts), rtol=1e-4, atol=1e-4)
    assert len(out.labels) == len(index)
    # the teacher's norms cost a teacher pass: on the first evaluation split only
    assert set(trainer.final_outputs["test_biased"].values) == {"student"}


def test_feature_norms_leave_out_non_finite_values(tmp_path: Path) -> None:
    """An untrained network in a dry run can overflow: its inf norms are counted, not drawn."""
    from pipeline.evaluate.plots import draw_feature_norms

    norms = {"student": torch.tensor([1.0, 1.2, 0.9]),
             "teacher": torch.tensor([float("inf"), 2.0, float("nan")])}
    fig = draw_feature_norms(norms, "norms")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[1].endswith("2 non-finite left out") and "non-finite" not in labels[0]
    out = tmp_path / "norms.png"
    fig.savefig(out)
    assert out.stat().st_size > 0
