"""A paper-layout table of runs: rows = methods, columns = teacher→student pairs × metrics.

Each cell holds the mean ± std over the seeds of its runs (sample std, as ``mean_std``) of the
metric at the **last** epoch (the run's latest logged value) and at the **best** epoch (the
``best/<key>`` summary the trainer logs: the epoch of the best top-1 on the first eval split),
and the **published** numbers for it (``pipeline/evaluate/published.py``: looked up by the
row's method label, so the rows of a grid show their method's published number, the paper's own
setting, beside each grid point). The best method of
every column (by its last-epoch mean; lower is better for ECE, AURC and NLL) is marked bold.
Rendered as Markdown and LaTeX here; HTML in ``report_html``.

Metric names: ``top1 top5 ece aurc nll`` (one column per eval split), ``probe`` (linear-probe
top-1, ``launch/probe.py``), ``knn20``/``knn200`` (k-NN top-1), or any MLflow metric key with a
``/`` (``transfer/transfer-stl10/probe/test/top1``). ECE is shown in %, AURC ×10³.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.evaluate.labels import ARROW
from pipeline.evaluate.published import Published, PublishedTable, lookup
from pipeline.evaluate.report import mean_std
from pipeline.evaluate.report_runs import TEACHER, RunRecord

# base metric → (header, scale, decimals, higher is better)
METRICS = {"top1": ("top-1 %", 1.0, 2, True), "top5": ("top-5 %", 1.0, 2, True),
           "ece": ("ECE %", 100.0, 2, False), "aurc": ("AURC ×10³", 1000.0, 2, False),
           "nll": ("NLL", 1.0, 3, False)}
EPOCHS = ("last", "best", "both")

Pair = tuple[str | None, str]


@dataclass
class Cell:
    last: tuple[float, float]
    best: tuple[float, float]
    n: int
    published: list[Published]
    runs: list[RunRecord]


@dataclass
class Table:
    title: str
    rows: list[str]
    pairs: list[Pair]
    metrics: list[str]
    cells: dict[tuple[str, Pair, str], Cell]
    epoch: str = "both"
    refs: list[str] = field(default_factory=list)  # "table id: paper, table", numbered from 1
    bold: set[tuple[str, Pair, str]] = field(default_factory=set)

    def ref(self, p: Published) -> int:
        text = f"{p.table}: {p.source}"
        if text not in self.refs:
            self.refs.append(text)
        return self.refs.index(text) + 1

    def has_best(self, pair: Pair, metric: str) -> bool:
        return self.epoch == "both" and any(
            not math.isnan(c.best[0]) for (_, p, m), c in self.cells.items()
            if (p, m) == (pair, metric))

    def has_published(self, pair: Pair, metric: str) -> bool:
        return any(c.published for (_, p, m), c in self.cells.items() if (p, m) == (pair, metric))


def metric_keys(names: Sequence[str], splits: Sequence[str]) -> list[str]:
    """``top1`` → ``<split>/top1`` for every split; ``probe`` → ``probe/<split>/top1``."""
    keys: list[str] = []
    for name in names:
        if "/" in name:
            keys.append(name)
        elif name in METRICS:
            keys += [f"{s}/{name}" for s in splits]
        elif name == "probe" or (name.startswith("knn") and name[3:].isdigit()):
            keys += [f"{name}/{s}/top1" for s in splits]
        else:
            raise ValueError(f"--metrics: {name!r}: expected one of {sorted(METRICS)}, probe, "
                             "knn<k>, or an MLflow metric key with a '/'")
    return list(dict.fromkeys(keys))


def metric_style(key: str) -> tuple[str, float, int, bool]:
    base = key.rsplit("/", 1)[-1]
    head, scale, digits, up = METRICS.get(base, (base, 1.0, 3, True))
    prefix = key.split("/")[0]
    if prefix == "probe" or prefix.startswith("knn") or prefix == "transfer":
        head = f"{prefix} {head}" if prefix != "transfer" else f"{key.split('/')[1]} {head}"
    split = key.split("/")[-2] if key.count("/") >= 1 else ""
    return (f"{split} {head}".strip(), scale, digits, up)


def fmt(key: str, mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    _, scale, digits, _ = metric_style(key)
    text = f"{mean * scale:.{digits}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def pair_text(pair: Pair) -> str:
    teacher, student = pair
    return f"{teacher} {ARROW} {student}" if teacher else student


def _pairs(records: Sequence[RunRecord]) -> list[Pair]:
    pairs = list(dict.fromkeys((r.teacher, r.student) for r in records
                               if r.row != TEACHER and r.teacher))
    students = {s for _, s in pairs}
    alone = [r for r in records if r.row != TEACHER and not r.teacher]
    pairs += list(dict.fromkeys((None, r.student) for r in alone if r.student not in students))
    return pairs


def _in_pair(rec: RunRecord, pair: Pair) -> bool:
    teacher, student = pair
    if rec.row == TEACHER:
        return rec.teacher == teacher and rec.student in ("", student)
    if rec.teacher:
        return (rec.teacher, rec.student) == pair
    return rec.student == student  # a student without teacher: in every pair of its network


def build_table(records: Sequence[RunRecord], metrics: Sequence[str],
                published: Sequence[PublishedTable] = (), title: str = "",
                epoch: str = "both") -> Table:
    """Group the runs into cells and look up the published number of every cell."""
    pairs = _pairs(records)
    rows = list(dict.fromkeys(r.row for r in records))
    rows.sort(key=lambda r: (r != TEACHER, r != "vanilla"))  # paper order: teacher, student
    present = [m for m in metrics if any(m in r.metrics for r in records)]
    if epoch not in EPOCHS:
        raise ValueError(f"--epoch: expected one of {EPOCHS}, found {epoch!r}")
    table = Table(title, rows, pairs, present, {}, epoch)
    for row in rows:
        for pair in pairs:
            runs = [r for r in records if r.row == row and _in_pair(r, pair)]
            if not runs:
                continue
            for key in present:
                have = [r for r in runs if key in r.metrics]
                if not have:
                    continue
                last = mean_std([r.metrics[key] for r in have])
                best = mean_std([r.metrics.get(f"best/{key}", math.nan) for r in have])
                if epoch == "best":  # the main value is the best epoch's
                    last = best
                pub = lookup(published, have[0].method, pair[0], pair[1], key, have[0].params)
                table.cells[(row, pair, key)] = Cell(last, best, len(have), pub, have)
    _mark_best(table)
    return number_refs(table)


def _mark_best(table: Table) -> None:
    for pair in table.pairs:
        for key in table.metrics:
            up = metric_style(key)[3]
            cands = [(c.last[0], row) for (row, p, m), c in table.cells.items()
                     if (p, m) == (pair, key) and row != TEACHER and not math.isnan(c.last[0])]
            if len(cands) > 1:
                value = (max if up else min)(v for v, _ in cands)
                table.bold |= {(row, pair, key) for v, row in cands if v == value}


def seeds_text(table: Table, row: str) -> str:
    ns = sorted({c.n for (r, _, _), c in table.cells.items() if r == row})
    return "–" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def columns(table: Table) -> list[tuple[Pair, str, str]]:
    """(pair, metric, kind) for every printed column; kind: ours, best, paper."""
    out = []
    for pair in table.pairs:
        for key in table.metrics:
            out.append((pair, key, "ours"))
            if table.has_best(pair, key):
                out.append((pair, key, "best"))
            if table.has_published(pair, key):
                out.append((pair, key, "paper"))
    return out


def cell_text(table: Table, row: str, pair: Pair, key: str, kind: str) -> str:
    """The plain text of one printed cell (no markup)."""
    cell = table.cells.get((row, pair, key))
    if cell is None:
        return ""
    if kind == "ours":
        return fmt(key, *cell.last, cell.n)
    if kind == "best":
        return fmt(key, *cell.best, cell.n)
    _, scale, digits, _ = metric_style(key)
    texts = []
    for p in cell.published:  # published numbers are stored as printed (no scaling)
        std = f" ± {p.std:.{digits}f}" if p.std is not None else ""
        texts.append(f"{p.value:.{digits}f}{std} [{table.ref(p)}]")
    return "; ".join(texts)


def header_text(table: Table, pair: Pair, key: str, kind: str) -> str:
    name = metric_style(key)[0]
    if table.epoch == "best" and kind == "ours":
        name += " (best epoch)"
    elif table.epoch == "both" and kind == "ours":
        name += " (last)"
    text = {"ours": name, "best": "best epoch", "paper": "paper"}[kind]
    return f"{pair_text(pair)}: {text}" if len(table.pairs) > 1 and kind == "ours" else text


def to_markdown(table: Table, with_title: bool = True) -> str:
    cols = columns(table)
    head = ["method", "seeds", *(header_text(table, p, k, kind) for p, k, kind in cols)]
    lines = [f"**{table.title}**" if table.title and with_title else "", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = []
        for pair, key, kind in cols:
            text = cell_text(table, row, pair, key, kind)
            if kind == "ours" and (row, pair, key) in table.bold and text:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join([row, seeds_text(table, row), *cells]) + " |")
    lines += ["", *notes(table)]
    return "\n".join(lines).strip() + "\n"


def notes(table: Table) -> list[str]:
    out = []
    if len(table.pairs) == 1:
        pair = table.pairs[0]
        out.append(f"Teacher → student: {pair_text(pair)}." if pair[0] else
                   f"Student: {pair_text(pair)}.")
    what = {"both": "at the last epoch; best epoch: at the epoch of the best top-1 on the first "
                    "eval split", "last": "at the last epoch", "best": "at the best epoch (that "
                    "of the best top-1 on the first eval split)"}[table.epoch]
    out.append(f"Mean ± std over seeds {what}. Bold: the best method of the column.")
    if table.refs:
        out.append("Published numbers: " + "; ".join(f"[{i}] {r}" for i, r in
                                                   enumerate(table.refs, 1)) + ".")
    else:
        out.append("No published number matches these runs (dataset, pair, metric).")
    return out


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                 ("#", r"\#"), ("±", r"$\pm$"), (ARROW, r"$\rightarrow$"), ("×", r"$\times$"),
                 ("–", "--"), ("³", r"$^3$")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table) -> str:
    """A booktabs table: a header row of pairs (when several), then the metric columns."""
    cols = columns(table)
    spec = "ll" + "r" * len(cols)
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title)}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if len(table.pairs) > 1:
        groups = [(p, sum(1 for c in cols if c[0] == p)) for p in table.pairs]
        out.append(" & & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_tex(pair_text(p))}}}"
                                        for p, n in groups) + r" \\")
    heads = [metric_style(k)[0] if kind == "ours" else kind.replace("best", "best epoch")
             for _, k, kind in cols]
    out.append("Method & Seeds & " + " & ".join(_tex(h) for h in heads) + r" \\")
    out.append(r"\midrule")
    for row in table.rows:
        cells = []
        for pair, key, kind in cols:
            text = _tex(cell_text(table, row, pair, key, kind))
            if kind == "ours" and (row, pair, key) in table.bold and text:
                text = rf"\textbf{{{text}}}"
            cells.append(text)
        out.append(" & ".join([_tex(row), seeds_text(table, row), *cells]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip",
            r"\footnotesize " + _tex(" ".join(notes(table))), r"\end{table}"]
    return "\n".join(out) + "\n"


def number_refs(table: Table) -> Table:
    """Number the references in reading order (row by row), before any rendering."""
    for row in table.rows:
        for pair, key, kind in columns(table):
            if kind == "paper":
                cell_text(table, row, pair, key, kind)
    return table
