"""Result tables: per-run rows, and mean ± std over seeds."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("top1", "ece")


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def split_values(metrics: dict, splits: Sequence[str], which: str = "last") -> dict[str, float]:
    """{"test_unbiased/top1": 81.2, ...} from a run's metrics.json (its last or best epoch)."""
    row = metrics.get(which) or {}
    return {f"{s}/{c}": float(row.get(f"{s}/{c}", math.nan)) for s in splits for c in COLUMNS}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return m, math.sqrt(var)


def format_table(rows: dict[str, list[dict[str, float]]], splits: Sequence[str]) -> str:
    """A plain-text table, one row per run name, cells "mean ± std" over that name's seeds."""
    heads = [f"{s} {c}" for s in splits for c in COLUMNS]
    cells: list[list[str]] = []
    for name, seeds in rows.items():
        line = [name, str(len(seeds))]
        for s in splits:
            for c in COLUMNS:
                m, sd = mean_std([r[f"{s}/{c}"] for r in seeds])
                scale, fmt = (1.0, "{:.2f}") if c == "top1" else (100.0, "{:.2f}")  # ECE → %
                text = fmt.format(m * scale)
                if len(seeds) > 1:
                    text += " ± " + fmt.format(sd * scale)
                line.append(text)
        cells.append(line)
    pretty = [h.replace("top1", "top-1 %").replace("ece", "ECE %") for h in heads]
    header = ["run", "seeds", *pretty]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)
