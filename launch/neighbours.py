"""Compute CoSS's nearest-neighbour lists once, from a teacher cache's eval-view embeddings.

    python launch/cache_teacher.py --cfg configs/demo/coss.yaml    # eval-view embeddings first
    python launch/neighbours.py --cfg configs/demo/coss.yaml       # then the lists

Reads ``<teacher.cache_dir>/eval_embedding.npy`` (the teacher's pooled embedding of every
training sample under the eval transform; the cache must be written with
``teacher.cache_eval_view: true``), L2-normalises it and keeps, for every sample, its ``--top-n``
most cosine-similar other samples (spec §4.3: 384), computed ``--chunk`` rows at a time. Writes
``data.neighbours`` (default ``<cache_dir>/neighbours_top<N>.npy``, int32 N × top_n) and a JSON
beside it naming the cache manifest it came from. A file that already matches the cache is kept
unless ``--force``. Exit status: 0 done, 2 config error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.threads import share_cpu_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cfg", required=True, help="the run config (teacher.cache_dir, data.*)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--top-n", type=int, default=0,
                   help="neighbours kept per sample (default: 384, the official value, or the "
                   "N in a data.neighbours name neighbours_top<N>.npy)")
    p.add_argument("--chunk", type=int, default=256, help="rows per similarity block")
    p.add_argument("--out", help="output .npy (default: data.neighbours, else "
                   "<cache_dir>/neighbours_top<N>.npy)")
    p.add_argument("--cpu", action="store_true", help="compute on the CPU even where CUDA is")
    p.add_argument("--force", action="store_true", help="recompute even if the file matches")
    return p.parse_args(argv)


def default_top_n(neighbours: str | None) -> int:
    """N of a ``neighbours_top<N>.npy`` name, else the official 384."""
    from pipeline.data.neighbours import DEFAULT_TOP_N

    stem = Path(neighbours).stem if neighbours else ""
    digits = stem.removeprefix("neighbours_top")
    return int(digits) if stem.startswith("neighbours_top") and digits.isdigit() else DEFAULT_TOP_N


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_run_config(args.cfg, args.overrides, check_paths=False)
        if spec.teacher is None or not spec.teacher.cache_dir:
            raise ConfigError(f"{args.cfg}: teacher.cache_dir: expected the teacher cache that "
                              "holds the eval-view embeddings, found none")
        import torch

        from pipeline.data.neighbours import neighbours_path, read_info
        from pipeline.teacher.cache_format import MANIFEST, Manifest
        from pipeline.teacher.neighbours import compute_cache_neighbours

        cache_dir = Path(spec.teacher.cache_dir).expanduser().resolve()
        top_n = args.top_n or default_top_n(spec.data.neighbours)
        if spec.data.sampler == "coss" and top_n < spec.data.coss_m:
            raise ConfigError(f"--top-n: expected at least data.coss_m = {spec.data.coss_m}, "
                              f"found {top_n}")
        out = Path(args.out or spec.data.neighbours or neighbours_path(cache_dir, top_n))
        info = read_info(out) if out.is_file() else None
        if info and not args.force and (cache_dir / MANIFEST).is_file():
            current = Manifest.load(cache_dir).id
            if info.get("manifest_id") == current and info.get("top_n") == top_n:
                print(f"{out}: up to date (top {top_n} of {info['num_samples']} samples)")
                return 0
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        if device == "cpu":
            share_cpu_threads()
        start = time.perf_counter()
        path = compute_cache_neighbours(cache_dir, top_n, args.chunk, device, out)
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import numpy as np

    lists = np.load(path, mmap_mode="r")
    print(f"wrote {path}: top {lists.shape[1]} neighbours of {lists.shape[0]} samples "
          f"({time.perf_counter() - start:.1f} s on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
