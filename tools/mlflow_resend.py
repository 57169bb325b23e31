"""Send a run's buffered MLflow calls (what the tracking server missed during an outage).

    python tools/mlflow_resend.py RUN_DIR [--uri URI] [--dry-run]

Reads ``RUN_DIR/mlflow_buffer.jsonl`` (written by pipeline/track/mlflow_tracker.py while the server
was unreachable) and replays it in order to the URI each record names (or ``--uri``). Sending twice
is harmless: metrics keep their original timestamps and MLflow drops exact duplicates. What was
sent leaves the buffer; on a failure the rest stays and the command exits 1, so run it again once
the server is back. A run that could not be created during the outage is created now, and
``run_info.json`` is updated with its id. Run it when the training is not writing to RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pipeline.track.buffer import (  # noqa: E402
    BUFFER_NAME,
    fail_fast_http,
    load_ids,
    read_records,
    replay,
    save_ids,
    write_records,
)


def _update_run_info(run_dir: Path, ids: dict[str, str]) -> None:
    path = run_dir / "run_info.json"
    if not ids or not path.exists():
        return
    info = json.loads(path.read_text())
    if info.get("mlflow_run_id") in ids:
        info["mlflow_run_id"] = ids[info["mlflow_run_id"]]
        path.write_text(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory holding " + BUFFER_NAME)
    p.add_argument("--uri", help="send to this tracking URI instead of the one in each record")
    p.add_argument("--dry-run", action="store_true", help="only say what would be sent")
    args = p.parse_args(argv)

    buffer = args.run_dir / BUFFER_NAME
    try:
        records = read_records(buffer)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"nothing to send: no {buffer}")
        return 0
    counts = Counter(r["op"] for r in records)
    n_metrics = sum(len(r["metrics"]) for r in records if r["op"] == "metrics")
    runs = sorted({r["run_id"] for r in records})
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{buffer}: {len(records)} record(s) ({summary}; {n_metrics} metric values) "
          f"for run(s) {', '.join(runs)}")
    if args.dry_run:
        return 0

    fail_fast_http()
    ids = load_ids(args.run_dir)
    known = set(ids)
    sent, left, err = replay(records, uri=args.uri, ids=ids)
    save_ids(args.run_dir, ids)
    _update_run_info(args.run_dir, ids)
    # Records appended while we were sending (a run still going) are kept after the unsent ones.
    newer = read_records(buffer)[len(records):]
    write_records(buffer, left + newer)
    if err is not None:
        print(f"sent {sent} of {len(records)} record(s); stopped at a {left[0]['op']} record: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        print(f"the other {len(left)} stay in {buffer}; run this again once the server is back",
              file=sys.stderr)
        return 1
    created = ", ".join(f"{k} → {v}" for k, v in ids.items() if k not in known)
    print(f"sent {sent} record(s)" + (f"; created run(s) {created}" if created else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
