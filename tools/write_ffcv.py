"""Convert a split of a run's dataset to an FFCV .beton for ``data.backend: ffcv``.

    python tools/write_ffcv.py --cfg configs/demo/kd.yaml --split train [--out PATH]
        [--max-resolution R] [--jpeg-quality Q] [--workers W] [--set key=value ...]

``--split`` may be repeated, or ``all`` (the training split and every eval split). The default
output is where the loader looks: ``<data.ffcv_dir or data.root/ffcv>/<split>.beton``. JPEGs are
kept as they are (when libjpeg-turbo decodes them like PIL), other images stored as raw pixels;
``--max-resolution`` resizes larger images to that longer side and re-encodes them at
``--jpeg-quality`` (default 90). Unreadable files are skipped and listed in ``<out>.json``.
Needs the ffcv extra (``pip install -e .[ffcv]``, apt packages in tools/apt-packages.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.data import build_index, build_train_index  # noqa: E402
from pipeline.data.backends import BackendUnavailable  # noqa: E402
from pipeline.data.ffcv import beton_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", required=True, help="YAML run config (its data section)")
    p.add_argument("--split", action="append", required=True,
                   help="split to convert (repeatable), or 'all'")
    p.add_argument("--out", help="output .beton (one split only; default: the loader's path)")
    p.add_argument("--max-resolution", type=int, default=0,
                   help="downscale images whose longer side exceeds R (0: keep all)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs")
    p.add_argument("--workers", type=int, default=0, help="writer processes (0: all cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for launch/train.py")
    args = p.parse_args(argv)
    try:
        from pipeline.data.ffcv_write import MODES, write_beton

        spec = load_run_config(args.cfg, args.set)
        splits = args.split
        if "all" in splits:
            splits = [spec.data.train_split, *spec.data.eval_splits]
        if args.out and len(splits) != 1:
            p.error("--out: expected a single --split")
        for split in splits:
            # The training split as the run trains on it (data.train_fraction, drop_classes).
            train = split == spec.data.train_split
            index = build_train_index(spec.data) if train else build_index(spec.data, split)
            out = Path(args.out) if args.out else beton_path(spec.data, split)
            print(f"{split}: {len(index)} samples from {index.root} -> {out}", flush=True)
            meta = write_beton(index, out, max_resolution=args.max_resolution,
                               jpeg_quality=args.jpeg_quality, workers=args.workers)
            counts = ", ".join(f"{name} {meta['counts'][name]}" for name in MODES.values())
            print(f"{split}: wrote {out} ({meta['beton_bytes'] / 2**20:.1f} MiB, {counts}) "
                  f"in {meta['seconds']} s", flush=True)
            for b in meta["bad"]:
                print(f"  skipped sample {b['index']} ({b['path']}): {b['error']}")
    except (ConfigError, BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
