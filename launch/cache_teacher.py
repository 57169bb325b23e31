"""Precompute the teacher's outputs once per (sample, view) into ``teacher.cache_dir``.

    python launch/cache_teacher.py --cfg configs/imagenet/r34_r18_kd.yaml --set data.views=10
    accelerate launch launch/cache_teacher.py --cfg ...     # several processes share the chunks
    python launch/cache_teacher.py --cfg ... --verify        # every chunk marked and intact?
    python launch/cache_teacher.py --cfg ... --repair        # rewrite the chunks that are not

The teacher runs in eval mode (autocast bf16/fp16 on GPU per train.mixed_precision) over the
K = data.views training views of every training sample, and over the deterministic eval view
with ``teacher.cache_eval_view: true``. Which fields are stored: ``teacher.cache_fields``, or
what the config's method reads. ``teacher.cache_dir`` defaults to
``runs/teacher_cache/<name>-K<views>`` (the directory a run with ``teacher.source: cached`` and
the same config reads). Re-running the same command resumes an interrupted pass; a directory
holding a cache of another configuration is refused. Train with it by setting
``teacher.source: cached``.

``--verify`` re-reads every chunk's bytes against the checksum in its completion marker; the
markers of corrupt chunks are moved aside (``done/<chunk>.corrupt.json``), so the next plain
run of this command rewrites them. ``--repair`` does both in one go.

SIGUSR1 / SIGTERM (Slurm's pre-emption warning): each process finishes the chunk it is writing,
marks it complete and exits 75 (the requeue status of ``launch/slurm/cache_teacher.sbatch``);
the re-run skips the complete chunks. Exit status: 0 done (or verified), 1 incomplete or
corrupt chunks, 2 config error, 75 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import load_run_config  # noqa: E402
from pipeline.config import ConfigError, RunSpec  # noqa: E402
from pipeline.config.defaults import default_cache_dir  # noqa: E402


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
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--verify",
        action="store_true",
        help="check every chunk's completion marker and checksums; exit 1 if any is missing "
        "or corrupt (the markers of corrupt chunks are moved aside, so a plain re-run "
        "rewrites those chunks)",
    )
    what.add_argument(
        "--repair",
        action="store_true",
        help="--verify, then write every chunk that is missing or corrupt",
    )
    return p.parse_args(argv)


def verify(cache_dir: str, *, set_aside: bool = True) -> int:
    """Print the state of every chunk of the cache; 0 if all are complete and intact. The
    markers of corrupt chunks are moved aside (main process only) when ``set_aside``."""
    from pipeline.teacher.cache_format import verify_cache
    from pipeline.teacher.cache_verify import set_aside_corrupt

    try:
        report = verify_cache(cache_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"verify {cache_dir}: {err}", file=sys.stderr)
        return 1
    print(f"verify {cache_dir}: {report.summary()}", file=sys.stdout if report.ok else sys.stderr)
    if report.corrupt and set_aside and int(os.environ.get("RANK", "0")) == 0:
        moved = set_aside_corrupt(Path(cache_dir), [unit for unit, _ in report.corrupt])
        print(f"verify {cache_dir}: {len(moved)} corrupt chunk(s) marked incomplete "
              f"(markers moved to done/<chunk>.corrupt.json); rewrite them by re-running this "
              f"command without --verify, or with --repair", file=sys.stderr)
    return 0 if report.ok else 1


def load(args: argparse.Namespace) -> RunSpec:
    """The run config, with ``teacher.cache_dir`` defaulted; ConfigError if it has no teacher."""
    spec = load_run_config(args.cfg, args.overrides, check_paths=not args.verify)
    if spec.teacher is None or not spec.teacher.arch:
        raise ConfigError(f"{args.cfg}: teacher.arch: expected the teacher whose outputs to "
                          "cache, found none (set teacher.arch and teacher.weights)")
    if not spec.teacher.cache_dir:
        spec.teacher.cache_dir = default_cache_dir(spec)
    return spec


class StopAtChunkEnd(Exception):
    """Raised by :func:`stop_after_chunk`'s callback once the chunk in progress is complete."""


def stop_after_chunk(flag: Any) -> Any:
    """``write_cache``'s ``after_batch``: once ``flag`` is signalled, stop when the next chunk
    starts, i.e. right after the chunk being written at the signal was marked complete (the
    first batch of the next one is discarded: it has no marker)."""
    last: list[Any] = [None]

    def after_batch(unit: Any, rows_done: int) -> None:
        if flag.signalled and last[0] is not None and unit != last[0]:
            raise StopAtChunkEnd(last[0].key)
        last[0] = unit

    return after_batch


def write(spec: RunSpec, repair: bool) -> int:
    """Write (or finish, or repair) the cache as this process; the exit status."""
    import torch
    from accelerate import PartialState

    from pipeline.teacher.cache_writer import cache_fields, write_cache
    from pipeline.threads import share_cpu_threads
    from pipeline.train.build import method_class, method_options
    from pipeline.train.signals import EXIT_REQUEUE, STOP

    assert spec.teacher is not None and spec.teacher.cache_dir
    state = PartialState(cpu=spec.train.cpu or not torch.cuda.is_available())
    if state.device.type == "cpu":
        share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    cache_dir = Path(spec.teacher.cache_dir).expanduser().resolve()
    if repair and state.is_main_process and (cache_dir / "manifest.json").is_file():
        verify(str(cache_dir))
    try:
        needs = method_class(spec).requirements(method_options(spec))
        if needs.teacher_batch_stats:
            raise ConfigError(
                f"method.name: method {spec.method['name']!r} runs the teacher's BatchNorm on each "
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
            after_batch=stop_after_chunk(STOP),
        )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except StopAtChunkEnd as stop:
        print(f"process {state.process_index}: stopped by a signal after completing chunk "
              f"{stop}; re-run the same command to finish the cache", file=sys.stderr)
        return EXIT_REQUEUE
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
            + ("" if repair else " (checksums of complete chunks not re-read: --verify or "
               "--repair do)")
        )
        return 0 if not missing else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipeline.train.signals import STOP

    STOP.install()  # first: a signal while the teacher loads still means "stop after a chunk"
    args = parse_args(argv)
    try:
        spec = load(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    assert spec.teacher is not None and spec.teacher.cache_dir
    if args.verify:
        return verify(spec.teacher.cache_dir)
    return write(spec, args.repair)


if __name__ == "__main__":
    sys.exit(main())
