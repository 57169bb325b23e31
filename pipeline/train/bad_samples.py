"""The run's report of unreadable samples: what the loaders skipped, told once per sample.

Every loader backend drops an unreadable file from its batch and adds it to ``index.bad``; each
process only meets the files of its own shard. After each epoch (training and evaluation)
the processes gather what they found; the main process prints the new ones, logs the running
count per split (``data/bad_samples/<split>``) and keeps the whole list in
``<run_dir>/bad_samples.json`` (split, index, path, error), rewritten atomically.

Interrupts lose nothing: every checkpoint first gathers what the processes found so far in the
epoch (``checkpoint_rows``) and stores the whole list in the checkpoint; a resumed run puts it
back (``restore``) into the report and into each split's ``index.bad``, so the batches skipped
by the resume are not missing from the final report, which equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.data.index import BadSample, DatasetIndex

SHOWN = 5  # new samples printed by name each time; the rest are in the file


class BadSampleReport:
    """Collects the unreadable samples of every split of a run across processes."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "bad_samples.json"
        self.found: dict[str, dict[int, dict[str, Any]]] = {}
        if self.path.exists():  # a resumed run keeps what it reported before
            for row in json.loads(self.path.read_text()):
                self.found.setdefault(row["split"], {})[int(row["index"])] = row

    def update(self, split: str, index: DatasetIndex, acc: Any, tracker: Any, step: int) -> None:
        """Gather ``index.bad`` of every process (a collective: every process calls it)."""
        local = [[split, int(b.index), str(b.path), str(b.error)] for b in index.bad]
        rows = local
        if acc.num_processes > 1:
            rows = acc.gather_for_metrics(local, use_gather_object=True)
        known = self.found.setdefault(split, {})
        new = []
        for s, i, path, error in rows:
            if i not in known:
                known[i] = {"split": s, "index": i, "path": path, "error": error}
                new.append(known[i])
        if not new or not acc.is_main_process:
            return
        new.sort(key=lambda r: r["index"])
        lines = [f"  {r['path']}: {r['error']}" for r in new[:SHOWN]]
        more = f"\n  ... and {len(new) - SHOWN} more" if len(new) > SHOWN else ""
        print(f"warning: {len(new)} unreadable sample(s) in {split}, skipped "
              f"({len(known)} so far; list in {self.path}):\n" + "\n".join(lines) + more,
              flush=True)
        tracker.log_metrics({f"data/bad_samples/{split}": float(len(known))}, step)
        self._write()

    def rows(self) -> list[dict[str, Any]]:
        """Every sample reported so far, by split and index."""
        return [r for split in sorted(self.found) for _, r in sorted(self.found[split].items())]

    def checkpoint_rows(self, split: str, index: DatasetIndex, acc: Any, tracker: Any,
                        step: int) -> list[dict[str, Any]]:
        """Gather the epoch's finds so far (a collective, like ``update``); the rows a checkpoint
        stores."""
        self.update(split, index, acc, tracker, step)
        return self.rows()

    def restore(self, rows: list[dict[str, Any]],
                indices: list[tuple[str, DatasetIndex]]) -> None:
        """Take back the rows of a checkpoint (and mark them in each (split, index))."""
        for row in rows:
            self.found.setdefault(row["split"], {})[int(row["index"])] = dict(row)
        for split, index in indices:
            known = self.found.get(split, {})
            index.record_bad([BadSample(int(r["index"]), str(r["path"]), str(r["error"]))
                              for _, r in sorted(known.items())])

    def _write(self) -> None:
        rows = self.rows()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, self.path)
