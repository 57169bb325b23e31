"""The report's bar chart (matplotlib, Agg, Figure objects: no pyplot state) and its
self-contained HTML page: inline CSS, every image a ``data:`` URI, no script, nothing fetched.

The chart has one panel per metric: a group of bars per teacher→student pair, one bar per row
(the last-epoch mean, or the best epoch's with ``epoch='best'``), the std over seeds as an error
bar and each published number as a black diamond on its bar. The page holds the table (the
published numbers beside ours, the best method of each column bold), the chart, and the per-run
plots found among the runs' artifacts (``plots/*.png``), one folded section per row and pair.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from pipeline.evaluate.report_runs import TEACHER
from pipeline.evaluate.report_table import (
    Table,
    cell_text,
    columns,
    header_text,
    metric_style,
    notes,
    pair_text,
    seeds_text,
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:1em 0}th,td{padding:.35em .7em;text-align:right;
white-space:nowrap;
border-bottom:1px solid #ddd}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.paper,th.paper{color:#666;font-style:italic}td.best,th.best{color:#444}
tr.teacher td{color:#555;background:#fafafa}
.notes{color:#555;font-size:.92em}img{max-width:100%;height:auto}
details{margin:.5em 0}summary{cursor:pointer}.plots img{max-width:380px;margin:4px;
border:1px solid #eee}
"""


def chart_png(table: Table, max_panels: int = 4) -> bytes | None:
    """The bar chart as PNG bytes; None when the table has no numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = table.metrics[:max_panels]
    if not keys or not table.cells:
        return None
    fig = Figure(figsize=(max(5.0, 4.2 * len(keys)), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    rows = table.rows
    width = 0.8 / max(1, len(rows))
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        name, scale, _, _ = metric_style(key)
        for j, row in enumerate(rows):
            xs, ys, errs, pubs = [], [], [], []
            for g, pair in enumerate(table.pairs):
                cell = table.cells.get((row, pair, key))
                if cell is None or math.isnan(cell.last[0]):
                    continue
                x = g - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(cell.last[0] * scale)
                errs.append(0.0 if math.isnan(cell.last[1]) else cell.last[1] * scale)
                pubs += [(x, p.value) for p in cell.published]
            if xs:
                ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=3, color=colours[j],
                       label=row, alpha=0.6 if row == TEACHER else 1.0)
            if pubs:
                ax.plot(*zip(*pubs, strict=True), "kD", markersize=4, label="paper")
        ax.set_xticks(range(len(table.pairs)), [pair_text(p) for p in table.pairs], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        _zoom(ax)
    seen: dict[str, Any] = {}
    for ax in fig.axes:  # one legend entry per row (and "paper"), from whichever panel has it
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=min(6, len(seen)),
               fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _zoom(ax: Any) -> None:
    """Start the y axis near the smallest bar, as the differences are small next to the values."""
    heights = [p.get_height() for p in ax.patches]
    if not heights:
        return
    lo, hi = min(heights), max(max(heights), ax.dataLim.y1)
    span = max(hi - lo, 1e-9)
    ax.set_ylim(max(0.0, lo - span * 0.6) if lo > 0 else lo, hi + span * 0.15)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _table_html(table: Table) -> str:
    cols = columns(table)
    esc = html.escape
    out = ["<table>", "<thead>"]
    if len(table.pairs) > 1:
        groups = [(p, sum(1 for c in cols if c[0] == p)) for p in table.pairs]
        out.append("<tr><th></th><th></th>" + "".join(
            f'<th colspan="{n}">{esc(pair_text(p))}</th>' for p, n in groups) + "</tr>")
    heads = [header_text(table, p, k, kind) if len(table.pairs) == 1 or kind != "ours"
             else metric_style(k)[0] for p, k, kind in cols]
    out.append("<tr><th>method</th><th>seeds</th>" + "".join(
        f'<th class="{kind}">{esc(h)}</th>' for h, (_, _, kind) in zip(heads, cols, strict=True))
        + "</tr></thead><tbody>")
    for row in table.rows:
        cells = []
        for pair, key, kind in cols:
            text = esc(cell_text(table, row, pair, key, kind))
            if kind == "ours" and (row, pair, key) in table.bold and text:
                text = f"<b>{text}</b>"
            cells.append(f'<td class="{kind}">{text}</td>')
        cls = ' class="teacher"' if row == TEACHER else ""
        out.append(f"<tr{cls}><td>{esc(row)}</td><td>{seeds_text(table, row)}</td>"
                   + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _plots_html(table: Table) -> str:
    parts = []
    for row in table.rows:
        for pair in table.pairs:
            cell = next((table.cells[k] for k in table.cells if k[:2] == (row, pair)), None)
            if cell is None:
                continue
            run = next((r for r in cell.runs if r.plots), None)
            if run is None:
                continue
            imgs = "".join(
                f'<figure><img alt="{html.escape(p.stem)}" src="{data_uri(p.read_bytes())}">'
                f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in run.plots)
            parts.append(f"<details><summary>{html.escape(row)} — {html.escape(pair_text(pair))}"
                         f" (run {html.escape(run.name)})</summary><div class=\"plots\">{imgs}"
                         "</div></details>")
    if not parts:
        return ""
    return "<h2>Per-run plots</h2>\n" + "\n".join(parts)


def to_html(table: Table, chart: bytes | None, heading: str, source: str) -> str:
    """The whole page as one string."""
    esc = html.escape
    chart_html = (f'<h2>Chart</h2><img alt="bar chart of the table" src="{data_uri(chart)}">'
                  if chart else "")
    note_html = "".join(f"<p>{esc(n)}</p>" for n in notes(table))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(heading)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{esc(heading)}</h1><p class=\"notes\">{esc(source)}</p>\n"
            f"{_table_html(table)}\n<div class=\"notes\">{note_html}</div>\n{chart_html}\n"
            f"{_plots_html(table)}\n</body></html>\n")


def write_report(table: Table, out: Path, heading: str, source: str) -> dict[str, Path]:
    """``report.md``, ``report.tex``, ``report.html`` and ``report.png`` in ``out``."""
    from pipeline.evaluate.report_table import to_latex, to_markdown

    out.mkdir(parents=True, exist_ok=True)
    chart = chart_png(table)
    paths = {"md": out / "report.md", "tex": out / "report.tex", "html": out / "report.html"}
    paths["md"].write_text(f"# {heading}\n\n{source}\n\n{to_markdown(table, False)}")
    paths["tex"].write_text(to_latex(table))
    paths["html"].write_text(to_html(table, chart, heading, source))
    if chart:
        paths["png"] = out / "report.png"
        paths["png"].write_bytes(chart)
    return paths
