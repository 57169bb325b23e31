"""tools/report.py: a paper-layout table from runs in an MLflow store the test makes itself (no
training), the published numbers beside ours, Markdown/LaTeX/HTML, the page in headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.evaluate.published import key_matches, load_table, load_tables
from tests.conftest import PY, ROOT, run_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOP1 = {  # (row, seed) → test/top1 history (the last entry is the last epoch)
    ("kd", 0): [60.0, 70.1], ("kd", 1): [61.0, 70.9], ("kd", 2): [62.0, 70.5],
    ("cid", 0): [60.0, 71.8], ("cid", 1): [60.0, 72.3],
    ("vanilla", 0): [50.0, 68.7], ("vanilla", 1): [50.0, 69.4],
}


def _png() -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _run(client, exp: str, name: str, params: dict, tags: dict, history: dict[str, list[float]],
         status: str = "FINISHED") -> str:
    run = client.create_run(exp, run_name=name, tags=tags)
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, v)
    for key, values in history.items():
        for step, value in enumerate(values):
            client.log_metric(rid, key, value, step=step)
    client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A study of kd, cid (pair resnet56→resnet20) and vanilla resnet20 on CIFAR-100, a teacher
    run, a failed run and a run outside the study; one run has a plot artifact."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cifar", artifact_location=(tmp / "art").as_uri())
    base = {"data.dataset": "cifar100", "data.eval_splits": "['test']", "model.arch": "resnet20"}
    teacher = _run(client, exp, "teacher", {**base, "model.arch": "resnet56", "teacher": "None",
                                            "method.name": "vanilla", "seed": "0"},
                   {}, {"test/top1": [72.0], "test/ece": [0.05]})
    parent = client.create_run(exp, run_name="s1", tags={"study": "true", "study_name": "s1"})
    ids = {}
    for (row, seed), top1 in TOP1.items():
        method = {"kd": "kd", "cid": "cid", "vanilla": "vanilla"}[row]
        params = {**base, "method.name": method, "seed": str(seed),
                  "teacher.arch": "None" if row == "vanilla" else "resnet56"}
        tags = {"mlflow.parentRunId": parent.info.run_id, "study": "s1", "study_label": row,
                "study_method": method, "study_seed": str(seed)}
        if row != "vanilla":
            tags["teacher_run_id"] = teacher
        ece = [0.2, 0.1 + 0.01 * seed]
        ids[(row, seed)] = _run(client, exp, f"s1/{row}-s{seed}", params, tags, {
            "test/top1": top1, "best/test/top1": [max(top1) + 0.5], "test/ece": ece,
            "best/test/ece": [ece[-1]]})
    # a failed run and a run of another study: neither counts
    _run(client, exp, "s1/kd-s3", {**base, "method.name": "kd", "seed": "3",
                                   "teacher.arch": "resnet56"},
         {"mlflow.parentRunId": parent.info.run_id, "study_label": "kd", "study_method": "kd"},
         {"test/top1": [0.0]}, status="FAILED")
    _run(client, exp, "other", {**base, "method.name": "kd", "seed": "0",
                                "teacher.arch": "resnet56"}, {}, {"test/top1": [1.0]})
    plot = tmp / "reliability_test.png"
    plot.write_bytes(_png())
    client.log_artifact(ids[("cid", 0)], str(plot), "plots")
    client.set_terminated(parent.info.run_id)
    return {"uri": uri, "tmp": tmp}


def _report(store: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "tools/report.py", "--study", "s1", "--tracking-uri",
                           store["uri"], "--out", str(out), *extra], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)


def _ours(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _md_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_cells_are_mean_std_of_their_runs_with_published_beside(store: dict,
                                                                 tmp_path: Path) -> None:
    done = _report(store, tmp_path / "r", "--metrics", "top1,ece")
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    heads = [c.strip() for c in header.strip("|").split("|")][1:]
    assert heads == ["seeds", "test top-1 % (last)", "best epoch", "paper", "test ECE % (last)",
                     "best epoch"]
    rows = _md_rows(md)
    assert list(rows) == ["teacher", "vanilla", "kd", "cid"]  # paper order: teacher, student
    for row in ("kd", "cid", "vanilla"):
        runs = [v for (r, _), v in TOP1.items() if r == row]
        seeds, last, best, paper, ece, _ = rows[row]
        assert seeds == str(len(runs))
        assert last.strip("*") == _ours([h[-1] for h in runs])  # the last epoch, not the max
        assert best == _ours([max(h) + 0.5 for h in runs])
        eces = [100 * (0.1 + 0.01 * s) for (r, s) in TOP1 if r == row]
        assert ece.strip("*") == _ours(eces)
    assert rows["cid"][1].startswith("**")  # the best top-1 of the column
    assert rows["vanilla"][4].startswith("**")  # ...and the lowest ECE
    assert rows["teacher"][1] == "72.00"
    # published: CID Table 2 (mean ± std) and the RepDistiller README for KD; numbered sources
    refs = dict(re.findall(r"\[(\d)\] ([^;]+?)(?:;|\.$)", md.splitlines()[-1]))
    by_table = {v.split(":")[0]: k for k, v in refs.items()}
    assert rows["kd"][3] == (f"70.66 ± 0.24 [{by_table['cid-table2']}]; "
                             f"70.66 [{by_table['repdistiller-readme']}]")
    assert rows["cid"][3] == f"71.90 ± 0.27 [{by_table['cid-table2']}]"
    assert rows["teacher"][3].startswith(f"72.34 [{by_table['cid-table2']}]")
    assert "Deng & Zhang" in refs[by_table["cid-table2"]]
    assert "Table 2" in refs[by_table["cid-table2"]]
    tex = (tmp_path / "r" / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"70.66 $\pm$ 0.24" in tex
    assert r"\textbf{" + _ours([h[-1] for (r, _), h in TOP1.items() if r == "cid"]).replace(
        "±", r"$\pm$") + "}" in tex
    page = (tmp_path / "r" / "report.html").read_text()
    assert "70.66 ± 0.24" in page and "<b>" in page
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 2  # chart, plot
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch
    assert (tmp_path / "r" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_best_epoch_mode_and_bad_input(store: dict, tmp_path: Path) -> None:
    done = _report(store, tmp_path / "b", "--epoch", "best", "--metrics", "top1", "--no-plots")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _md_rows((tmp_path / "b" / "report.md").read_text())
    kd = [max(h) + 0.5 for (r, _), h in TOP1.items() if r == "kd"]
    assert rows["kd"][1] == _ours(kd) and len(rows["kd"]) == 3  # seeds, ours, paper
    bad = _report(store, tmp_path / "x", "--metrics", "top1,acc")
    assert bad.returncode == 2 and "'acc'" in bad.stderr and "top5" in bad.stderr
    bad = _report(store, tmp_path / "x", "--study", "nope")
    assert bad.returncode == 2 and "'nope'" in bad.stderr


def test_published_files_are_checked(tmp_path: Path) -> None:
    tables = load_tables([ROOT / "reports" / "published"])
    assert {t.table for t in tables} >= {f"cid-table{i}" for i in range(1, 7)}
    bad = tmp_path / "bad.yaml"
    bad.write_text("table: t\nsource: {paper: P, table: T1}\ncolumns:\n"
                   "  a: {student: resnet8, metric: '*/top1'}\nrows:\n  kd: {b: 70.1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rows.kd.b: expected a column of \['a'\]"):
        load_table(bad)
    bad.write_text("table: t\nsource: {paper: P, table: T1}\ncolumns:\n"
                   "  a: {student: resnet8, metric: '*/top1'}\nrows:\n  kd: {a: high}\n")
    with pytest.raises(ConfigError, match="rows.kd.a: expected a number or"):
        load_table(bad)
    assert key_matches("*/top1", "test/top1") and not key_matches("*/top1", "probe/test/top1")


def _chromium_image_widths(page: Path, tmp_path: Path) -> list[int]:
    """Open a copy of the page with a probe script appended: it writes each <img>'s
    naturalWidth into the DOM once the page has loaded; Chromium dumps the DOM."""
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');"
              "p.id='widths';p.textContent=[...document.images].map(i=>i.complete?i.naturalWidth:"
              "-1).join(',');document.body.appendChild(p);});</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="widths">([^<]*)</pre>', done.stdout)
    assert found, done.stdout[-2000:]
    return [int(w) for w in found.group(1).split(",") if w]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs the Debian chromium package "
                    "(/usr/bin/chromium) to open the HTML report")
def test_html_page_opens_in_chromium_with_every_image_loaded(store: dict, tmp_path: Path) -> None:
    done = _report(store, tmp_path / "r")
    assert done.returncode == 0, done.stderr[-3000:]
    page = tmp_path / "r" / "report.html"
    widths = _chromium_image_widths(page, tmp_path)
    assert len(widths) == page.read_text().count("<img ") == 2
    assert all(w > 0 for w in widths), widths



@pytest.mark.parametrize("cfg, label", [
    ("configs/cifar100/wrn_40_2_wrn_16_2_fitnet_kd.yaml", "fitnet+kd"),
    ("configs/cifar100/wrn_40_2_wrn_16_2_sp_kd_intervention.yaml", "cid.intervention+sp+kd"),
    ("configs/demo/cid.yaml", "cid"),
    ("configs/demo/teacher_mse.yaml", "vanilla-mse"),
])
def test_method_label_from_config_equals_label_from_mlflow_params(cfg: str, label: str) -> None:
    """A study tags runs with the config's label; a report of untagged runs derives it from the
    params the trainer logs (the flattened config): both spellings agree."""
    from dataclasses import asdict

    from pipeline.catalog import load_run_config
    from pipeline.evaluate.labels import method_from_params, method_label
    from pipeline.track.mlflow_tracker import flatten

    spec = load_run_config(ROOT / cfg, check_paths=False)
    assert method_label(spec.method) == label
    assert method_label(method_from_params(flatten(asdict(spec)))) == label


def test_two_pairs_and_a_data_limited_column_without_mlflow() -> None:
    """Runs of two pairs: one column group per pair (Markdown, LaTeX, HTML); the published
    number of a data-limited run is the one of its training fraction (CID Table 6)."""
    from pipeline.evaluate.report_html import to_html
    from pipeline.evaluate.report_runs import RunRecord
    from pipeline.evaluate.report_table import build_table, to_latex, to_markdown

    def rec(i: int, teacher: str, student: str, fraction: str, top1: float) -> RunRecord:
        params = {"data.dataset": "cifar100", "data.train_fraction": fraction}
        return RunRecord(str(i), f"r{i}", i, params, {}, {"test/top1": top1}, row="cid",
                         method="cid", teacher=teacher, student=student, seed=str(i))

    records = [rec(0, "vgg13", "vgg8", "0.2", 60.0), rec(1, "vgg13", "vgg8", "0.2", 61.0),
               rec(2, "resnet56", "resnet20", "1.0", 71.0)]
    table = build_table(records, ["test/top1"], load_tables([ROOT / "reports" / "published"]),
                        "t", "last")
    md = to_markdown(table)
    assert "| vgg13 → vgg8: test top-1 % | paper | resnet56 → resnet20: test top-1 % |" in md
    cells = _md_rows(md)["cid"]
    assert cells[:2] == ["1–2", "60.50 ± 0.71"]  # one method: nothing to mark bold
    assert cells[2].startswith("62.13 [")  # the 20 % column of Table 6, not 68.64 (40 %)
    assert cells[3] == "71.00" and cells[4].startswith("71.90 ± 0.27 [")
    tex = to_latex(table)
    assert r"\multicolumn{2}{c}{vgg13 $\rightarrow$ vgg8}" in tex
    assert r"\multicolumn{2}{c}{resnet56 $\rightarrow$ resnet20}" in tex
    assert '<th colspan="2">vgg13 → vgg8</th>' in to_html(table, None, "h", "s")
