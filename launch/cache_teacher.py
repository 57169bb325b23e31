"""Precompute the teacher's outputs once per (sample, view) into ``teacher.cache_dir``.

    python launch/cache_teacher.py --cfg configs/imagenet/r34_r18_kd.yaml --set data.views=10
    accelerate launch launch/cache_teacher.py --cfg ...     # several processes share the chunks
    python launch/cache_teacher.py --cfg ... --verify        # every chunk marked and intact?

The teacher runs in eval mode (autocast bf16/fp16 on GPU per train.mixed_precision) over the
K = data.views training views of every training sample, and over the deterministic eval view
with ``teacher.cache_eval_view: true``. Which fields are stored: ``teacher.cache_fields``, or
what the config's method reads. Re-running the same command resumes an interrupted pass;
a directory holding a cache of another configuration is refused. Train with it by setting
``teacher.source: cached``. Exit status: 0 done (or verified), 1 incomplete or corrupt chunks
(--verify), 2 config error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML run config (the run the cache is for)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.views=10 (repeatable)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every chunk's completion marker and checksums; exit 1 if any is missing "
        "or corrupt (writes nothing)",
    )
    return p.parse_args(argv)


def verify(cache_dir: str) -> int:
    """Print the state of every chunk of the cache; 0 if all are complete and intact."""
    from pipeline.teacher.cache_format import verify_cache

    try:
        report = verify_cache(cache_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"verify {cache_dir}: {err}", file=sys.stderr)
        return 1
    print(f"verify {cache_dir}: {report.summary()}", file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_run_config(args.cfg, args.overrides, check_paths=not args.verify)
        if spec.teacher is None or not spec.teacher.arch or not spec.teacher.cache_dir:
            raise ConfigError(
                f"{args.cfg}: teacher.arch and teacher.cache_dir: expected both to write a "
                f"teacher cache, found {spec.teacher!r}"
            )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.verify:
        return verify(spec.teacher.cache_dir)

    import torch
    from accelerate import PartialState

    from pipeline.teacher.cache_writer import cache_fields, write_cache
    from pipeline.train.build import method_class, method_options

    state = PartialState(cpu=spec.train.cpu or not torch.cuda.is_available())
    try:
        needs = method_class(spec).requirements(method_options(spec))
        if needs.teacher_batch_stats:
            raise ConfigError(
                f"{args.cfg}: method {spec.method['name']!r} runs the teacher's BatchNorm on each "
                "batch's statistics, which depend on the batch and cannot be cached (for reviewkd "
                "set method.teacher_bn: eval)")
        fields = cache_fields(spec, needs.teacher_outputs)
        report = write_cache(
            spec,
            fields,
            stages=needs.teacher_stages,
            preact=needs.teacher_preact,
            process_index=state.process_index,
            num_processes=state.num_processes,
            device=state.device,
            barrier=state.wait_for_everyone,
        )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if state.is_main_process:
        from pipeline.teacher.cache_format import Manifest, missing_units

        root = Path(spec.teacher.cache_dir).expanduser().resolve()
        manifest = Manifest.load(root)
        missing = missing_units(root, manifest, manifest.units())
        print(
            f"teacher cache {root}: fields {manifest.fields}"
            f"{f' (stages {manifest.stages})' if manifest.stages else ''}, {manifest.views} view(s)"
            f"{' + eval view' if manifest.eval_view else ''}, {manifest.num_samples} samples; "
            f"process 0 wrote {report.units_written} chunk(s) ({report.images} images, "
            f"{report.images_per_s:.0f} img/s), skipped {report.units_skipped} complete; "
            f"{len(missing)} of {len(manifest.units())} chunks incomplete"
        )
        return 0 if not missing else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
