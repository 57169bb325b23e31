"""The plots of a run, drawn once at its end from what evaluation already computed.

    <run_dir>/plots/reliability_<split>.png     reliability diagram per evaluation split
    <run_dir>/plots/per_class_accuracy.png      per-class top-1 of every split
    <run_dir>/plots/confusion_<split>.png       confusion matrix (only with <= 20 classes)
    <run_dir>/plots/training_curves.png         every loss term and top-1 per split, per epoch
    <run_dir>/plots/feature_norms_<split>.png   penultimate L2 norms (student vs teacher)

The reliability diagram bins the max-softmax confidence exactly as ``metrics.ece`` does (15
equal-width bins, bin i holding (i/15, (i+1)/15]), so its gaps sum to the ECE the run logged. The
feature-norm histogram is CID Fig. 2 (Deng & Zhang, NeurIPS 2021, §3.1: the teacher's feature
norms spread over a wide range, the bias NM_MSE removes); we draw the student's norms beside the
teacher's, over the evaluation split rather than the paper's training set.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas directly: pyplot is
never imported, so no global figure state or interactive backend is involved, whatever
``MPLBACKEND`` says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluate.loop import SplitOutputs

MAX_CONFUSION_CLASSES = 20
N_BINS = 15  # as metrics.ece
DPI = 100


def reliability_bins(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN when empty).

    Bin i holds the confidences in (i/n, (i+1)/n] (confidence 0 falls in bin 0), the binning of
    ``metrics.ece``; ECE = Σ_i count_i/N · |accuracy_i − confidence_i|.
    """
    if conf.shape != correct.shape or conf.dim() != 1:
        raise ValueError(f"reliability_bins: expected conf and correct of one shape (N,), found "
                         f"{tuple(conf.shape)} and {tuple(correct.shape)}")
    conf, correct = conf.double(), correct.double()
    edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    bins = torch.bucketize(conf, edges, right=False)
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count.numpy(), "confidence": (conf_sum / count).numpy(),
                "accuracy": (acc_sum / count).numpy()}


def predictions(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max-softmax confidence (float64) and argmax class of each row."""
    conf, pred = torch.softmax(logits.double(), dim=1).max(dim=1)
    return conf, pred


def per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """Top-1 in percent per true class (NaN for a class without samples)."""
    total = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (100.0 * hits / total).numpy()


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + pred.long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).numpy()


def _figure(width: float, height: float, **margins: float) -> Any:
    """A figure on its own Agg canvas. Fixed margins (inches) instead of a layout engine:
    constrained layout measured half the drawing time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    inch = {"left": 0.8, "right": 0.3, "bottom": 0.7, "top": 0.45, **margins}
    fig.subplots_adjust(left=inch["left"] / width, right=1 - inch["right"] / width,
                        bottom=inch["bottom"] / height, top=1 - inch["top"] / height,
                        wspace=0.25, hspace=0.15)
    return fig


def draw_reliability(bins: dict[str, np.ndarray], title: str) -> Any:
    n = len(bins["count"])
    centres = (np.arange(n) + 0.5) / n
    acc = np.nan_to_num(bins["accuracy"])
    conf = np.where(bins["count"] > 0, bins["confidence"], 0.0)  # an empty bin: no gap bar
    total = max(bins["count"].sum(), 1.0)
    ece = float(np.nansum(bins["count"] / total * np.abs(bins["accuracy"] - bins["confidence"])))
    fig = _figure(5.0, 5.5)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(centres, acc, width=1 / n, edgecolor="black", color="tab:blue", label="accuracy")
    gap = np.where(bins["count"] > 0, conf - acc, 0.0)
    ax.bar(centres, gap, bottom=acc, width=1 / n, color="tab:red", alpha=0.3, edgecolor="tab:red",
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"{title} (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, bins["count"] / total, width=1 / n, color="grey", edgecolor="black")
    hist.set(xlim=(0, 1), xlabel="confidence (max softmax)", ylabel="share")
    return fig


def draw_per_class(accs: dict[str, np.ndarray], class_names: Sequence[str]) -> Any:
    n = len(class_names)
    width = min(max(6.0, 0.35 * n * max(len(accs), 1)), 20.0)
    fig = _figure(width, 4.0, bottom=0.9 if n > 10 else 0.6)
    ax = fig.subplots()
    step = 0.8 / max(len(accs), 1)
    x = np.arange(n)
    for i, (split, acc) in enumerate(accs.items()):
        ax.bar(x + (i - (len(accs) - 1) / 2) * step, np.nan_to_num(acc), width=step, label=split)
    if n <= 50:
        ax.set_xticks(x, [str(c) for c in class_names], rotation=90 if n > 10 else 0,
                      fontsize=8)
    ax.set(ylim=(0, 100), ylabel="top-1 (%)", xlabel="class", title="per-class accuracy")
    ax.legend(fontsize=8)
    return fig


def draw_confusion(counts: np.ndarray, class_names: Sequence[str], title: str) -> Any:
    n = len(class_names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    fig = _figure(2.2 + 0.45 * n, 1.6 + 0.45 * n, left=0.7, right=0.2, bottom=0.8)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = [str(c) for c in class_names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    return fig


def draw_curves(history: Sequence[dict[str, Any]]) -> Any | None:
    """Loss terms (``train/<term>``) and ``<split>/top1`` against the epoch; None if empty."""
    losses = sorted({k for row in history for k in row if k.startswith("train/")})
    top1 = sorted({k for row in history for k in row if k.endswith("/top1")})
    if not losses and not top1:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0, 4.0)
    ax_loss, ax_top1 = fig.subplots(1, 2)
    for ax, keys in ((ax_loss, losses), (ax_top1, top1)):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in history if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if keys:
            ax.legend(fontsize=8)
    ax_loss.set(ylabel="mean over the epoch's steps", title="training loss terms")
    ax_top1.set(ylabel="top-1 (%)", title="evaluation top-1")
    return fig


def draw_feature_norms(norms: dict[str, Tensor], title: str) -> Any:
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    # Non-finite norms (an overflowing untrained network, fp16 features) are counted, not drawn.
    finite = {k: v.double().numpy() for k, v in norms.items()}
    dropped = {k: int((~np.isfinite(v)).sum()) for k, v in finite.items()}
    finite = {k: v[np.isfinite(v)] for k, v in finite.items()}
    pooled = np.concatenate([v for v in finite.values()] or [np.zeros(0)])
    edges = np.histogram_bin_edges(pooled if pooled.size else np.zeros(1), bins=60)
    for name, v in finite.items():
        label = f"{name} (mean {v.mean():.2f}, std {v.std():.2f})" if v.size else f"{name}"
        if dropped[name]:
            label += f", {dropped[name]} non-finite left out"
        ax.hist(v, bins=edges, alpha=0.5, label=label)
    ax.set(xlabel="L2 norm of the penultimate feature", ylabel="samples", title=title)
    ax.legend(fontsize=8)
    return fig


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def write_plots(
    out_dir: Path,
    outputs: dict[str, SplitOutputs],
    class_names: Sequence[str],
    history: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """Draw every plot that ``outputs`` (per split) and ``history`` (per-epoch rows: ``epoch``,
    ``train/<term>``, ``<split>/top1`` ...) allow into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    accs: dict[str, np.ndarray] = {}
    names = list(class_names)
    for split, out in outputs.items():
        if out.labels.numel() == 0:
            continue
        n = out.logits.shape[1]  # a head may have more outputs than the split has class names
        names += [str(i) for i in range(len(names), n)]
        conf, pred = predictions(out.logits)
        labels = out.labels.long()
        bins = reliability_bins(conf, (pred == labels).double())
        files.append(_save(draw_reliability(bins, f"reliability: {split}"),
                           out_dir / f"reliability_{split}.png"))
        accs[split] = per_class_accuracy(pred, labels, n)
        if n <= MAX_CONFUSION_CLASSES:
            fig = draw_confusion(confusion_matrix(pred, labels, n), names[:n],
                                 f"confusion matrix: {split}")
            files.append(_save(fig, out_dir / f"confusion_{split}.png"))
        if out.values:
            fig = draw_feature_norms(out.values, f"penultimate feature norms: {split}")
            files.append(_save(fig, out_dir / f"feature_norms_{split}.png"))
    if accs:
        width = max(len(a) for a in accs.values())
        accs = {k: np.pad(a, (0, width - len(a)), constant_values=np.nan) for k, a in accs.items()}
        files.append(_save(draw_per_class(accs, names[:width]), out_dir / "per_class_accuracy.png"))
    curves = draw_curves(history) if history else None
    if curves is not None:
        files.append(_save(curves, out_dir / "training_curves.png"))
    return files


__all__ = ["MAX_CONFUSION_CLASSES", "confusion_matrix", "draw_curves", "draw_feature_norms",
           "per_class_accuracy", "predictions", "reliability_bins", "write_plots"]
