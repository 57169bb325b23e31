"""Values derived from other keys when a config leaves them unset."""

from __future__ import annotations

from pipeline.config.schema import RunSpec

CACHE_ROOT = "runs/teacher_cache"


def default_cache_dir(spec: RunSpec) -> str:
    """``teacher.cache_dir`` when null: ``runs/teacher_cache/<name>-K<data.views>`` (plus
    ``-eval`` with ``teacher.cache_eval_view``), relative to the working directory like every
    config path. The writer (``launch/cache_teacher.py``) and a run with ``teacher.source:
    cached`` derive the same directory from the same config and ``--set`` flags; a directory
    holding a cache of another configuration is refused with the differing keys."""
    eval_view = spec.teacher is not None and spec.teacher.cache_eval_view
    return f"{CACHE_ROOT}/{spec.name}-K{spec.data.views}" + ("-eval" if eval_view else "")
