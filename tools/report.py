"""A paper-style table of finished runs, read back from MLflow, with the published numbers.

    # the runs of a study (its MLflow parent run: the --name given to tools/study.py, or its id)
    python tools/report.py --study demo-study --out runs/demo-study/report
    # every finished run of some experiments, other columns, another tracking server
    python tools/report.py --experiment cifar100-cid --experiment cifar100-kd \\
        --metrics top1,top5,ece,aurc --tracking-uri http://mlflow:5000 --out reports/cifar100

Rows are methods (a study's row name + grid point, else the method label: ``kd``,
``fitnet+kd``, ``cid``; ``teacher`` from the students' lineage), columns the teacher→student
pairs × the chosen metrics (``top1 top5 ece aurc nll probe knn20`` per eval split, or MLflow
metric keys), each cell the mean ± std over seeds at the last epoch, with the best epoch's beside
it (``--epoch``), and the published number of every cell a paper gives one for
(``reports/published/*.yaml``, each with its paper and table). Writes ``report.md``,
``report.tex``, ``report.html`` (self-contained: inline CSS, images as data: URIs, with the bar
chart and the runs' ``plots/`` artifacts) and ``report.png``; prints the Markdown.
Exit status 0, 2 on bad input (an unknown experiment, study or metric, a bad published file).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError  # noqa: E402
from pipeline.evaluate.published import load_tables  # noqa: E402
from pipeline.evaluate.report_html import write_report  # noqa: E402
from pipeline.evaluate.report_runs import fetch_plots, read_runs  # noqa: E402
from pipeline.evaluate.report_table import EPOCHS, build_table, metric_keys, to_markdown  # noqa: E402
from pipeline.track.mlflow_tracker import default_uri  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", help="a study's parent run: its name (tools/study.py --name) or id")
    p.add_argument("--experiment", action="append", default=[],
                   help="MLflow experiment to read (repeatable; default: all, or the study's)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<cwd>/mlruns.db (the project's store)")
    p.add_argument("--metrics", default="top1,ece",
                   help="comma-separated: top1 top5 ece aurc nll probe knn<k>, or metric keys")
    p.add_argument("--splits", help="comma-separated eval splits (default: those of the runs)")
    p.add_argument("--epoch", choices=EPOCHS, default="both",
                   help="last epoch, best epoch, or last with best beside it (default)")
    p.add_argument("--published", type=Path, action="append",
                   help="published-number files or folders (default: reports/published)")
    p.add_argument("--title", help="the table's caption")
    p.add_argument("--out", type=Path, help="folder for report.{md,tex,html,png} "
                   "(default: runs/<study>/report, or runs/report)")
    p.add_argument("--no-plots", action="store_true", help="leave the runs' plots out of the HTML")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import os

    from mlflow.tracking import MlflowClient

    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not args.study and not args.experiment:
        print("error: give --study NAME or --experiment NAME (or both)", file=sys.stderr)
        return 2
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        published = load_tables(args.published or [ROOT / "reports" / "published"])
        records = read_runs(client, args.experiment, args.study)
        if not records:
            raise ConfigError(f"no finished runs for --study {args.study!r} / --experiment "
                              f"{args.experiment} in {uri}")
        splits = (args.splits.split(",") if args.splits else
                  list(dict.fromkeys(s for r in records for s in r.eval_splits)))
        keys = metric_keys([m.strip() for m in args.metrics.split(",") if m.strip()], splits)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = f"study {args.study}" if args.study else "experiments " + ", ".join(args.experiment)
    heading = args.title or f"Results: {what}"
    table = build_table(records, keys, published, heading, args.epoch)
    if not table.metrics:
        print(f"error: --metrics: none of the {len(records)} runs has any of {keys}",
              file=sys.stderr)
        return 2
    out = args.out or ROOT / "runs" / (args.study or "report") / ("report" if args.study else "")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_plots:
            for rec in records:
                fetch_plots(client, rec, Path(tmp) / rec.run_id)
        source = f"{len(records)} finished runs of {what}, read from {uri}."
        paths = write_report(table, out, heading, source)
    print(to_markdown(table))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
