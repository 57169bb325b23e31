"""The demo's figure: top-1 on each evaluation split per run, mean ± std over seeds.

One group of bars per run (teacher, vanilla, KD, ...), one bar per split; a dashed line marks what
the background-colour rule alone scores on each split, so a student that learned the shortcut
sits on the lines and one that learned the digits stands above the unbiased one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; before any backend is touched

from matplotlib.figure import Figure  # noqa: E402

from pipeline.evaluate.report import mean_std  # noqa: E402

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")


def draw_demo_figure(rows: dict[str, list[dict[str, float]]], splits: Sequence[str],
                     path: Path, shortcut: dict[str, float] | None = None) -> Path:
    """Grouped bars of ``<split>/top1`` (mean over a row's seeds, std as error bars) → PNG;
    ``shortcut``: the top-1 % of the colour rule alone per split (dashed lines)."""
    shortcut = shortcut or {}
    names = list(rows)
    fig = Figure(figsize=(1.6 + 1.5 * len(names), 4.2), dpi=110)
    ax = fig.add_subplot()
    width = 0.8 / max(len(splits), 1)
    for j, split in enumerate(splits):
        stats = [mean_std([r[f"{split}/top1"] for r in rows[n]]) for n in names]
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(names))]
        colour = COLOURS[j % len(COLOURS)]
        bars = ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats],
                      capsize=3, label=split, color=colour)
        ax.bar_label(bars, labels=[f"{m:.0f}" for m, _ in stats], fontsize=7, padding=2)
        if split in shortcut:
            ax.axhline(shortcut[split], color=colour, linestyle="--", linewidth=1,
                       label=f"colour rule alone on {split}")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("top-1 % (last epoch)")
    ax.set_ylim(0, 122)  # headroom for the legend above 100 %
    ax.legend(fontsize=7, loc="upper center", ncols=4, frameon=False)
    ax.set_title("Who learned the digits, and who the background colour?", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
