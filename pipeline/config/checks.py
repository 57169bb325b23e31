"""Rules a config must meet beyond names and types: value ranges, cross-field rules, paths.

Relative paths (``data.root``, ``model.weights``, ``teacher.weights``) resolve against the current
working directory, as everywhere in a config except ``base:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.coerce import fail, file_for
from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.registry import Registry, closest

TIMM_PREFIX = "timm:"  # model.arch: timm:<name> builds timm.create_model(<name>)


def check_values(spec: RunSpec, method_cls: Any, root: str) -> None:
    """Rules that involve values, not just types."""
    data, optim = spec.data, spec.optim
    if not data.eval_splits:
        fail("data.eval_splits", "expected at least one split, found []", root)
    minimums = [
        ("data.batch_size", data.batch_size, 1),
        ("data.eval_batch_size", data.eval_batch_size, 1),
        ("data.image_size", data.image_size, 1),
        ("data.workers", data.workers, 0),
        ("data.views", data.views, 0),
        ("optim.epochs", optim.epochs, 1),
        ("optim.grad_accum", optim.grad_accum, 1),
        ("train.stop_check_every_steps", spec.train.stop_check_every_steps, 1),
        ("train.log_every_steps", spec.train.log_every_steps, 1),
    ]
    if spec.teacher is not None:
        minimums.append(("teacher.cache_prefetch", spec.teacher.cache_prefetch, 0))
    for key, value, low in minimums:
        if value < low:
            fail(key, f"expected a value >= {low}, found {value}", root)
    for key, values in (("data.mean", data.mean), ("data.std", data.std)):
        if len(values) != 3:
            fail(key, f"expected 3 values (one per RGB channel), found {len(values)}", root)
    if data.sampler == "coss":  # CoSS nearest-neighbour batches (pipeline/data/coss_sampler.py)
        if not 0 <= data.coss_k <= data.coss_m:
            fail("data.coss_k", f"expected 0 <= coss_k <= coss_m = {data.coss_m}, found "
                 f"{data.coss_k}", root)
        if data.batch_size % (1 + data.coss_k):
            fail("data.batch_size", f"expected a multiple of 1 + data.coss_k = {1 + data.coss_k} "
                 f"(anchors × (1 + k) images), found {data.batch_size}", root)
        if data.coss_k > 0 and not data.neighbours:
            fail("data.neighbours", "required when data.sampler is 'coss' and coss_k > 0 (a "
                 "file written by launch/neighbours.py), found null", root)
    milestones = optim.milestones
    if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
        fail("optim.milestones", f"expected increasing epochs, found {milestones}", root)
    options = getattr(spec, "method_options", None)
    if options is not None and hasattr(method_cls, "check_run"):
        try:
            method_cls.check_run(options, optim.epochs)
        except ValueError as err:  # "<option>: <what is wrong>"
            key, _, message = str(err).partition(": ")
            fail(f"method.{key}", message, root)
    teacher = spec.teacher
    if getattr(method_cls, "needs_teacher", False) and (teacher is None or not teacher.arch):
        name = spec.method["name"]
        raise ConfigError(
            f"{file_for('method.name', root)}: method {name!r} needs a teacher: set teacher.arch"
        )
    if teacher is not None and teacher.source == "cached" and not teacher.cache_dir:
        fail("teacher.cache_dir", "required when teacher.source is 'cached', found null", root)
    if teacher is not None and teacher.source == "cached" and data.ffcv_random_crop:
        fail("data.ffcv_random_crop", "expected false when teacher.source is 'cached': FFCV's own "
             "random crops are not the plan's views that the cache describes", root)


def check_archs(spec: RunSpec, models: Registry[Any], root: str) -> None:
    """``model.arch`` and ``teacher.arch`` name registered networks (or ``timm:<name>``)."""
    archs = [("model.arch", spec.model.arch)]
    if spec.teacher is not None and spec.teacher.arch:
        archs.append(("teacher.arch", spec.teacher.arch))
    for key, arch in archs:
        if arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX):
            continue  # timm's own names are checked when the network is built
        if arch not in models:
            hint = closest(arch, models.names())
            tail = f"did you mean {hint!r}? " if hint else ""
            fail(key, f"unknown network {arch!r}; {tail}(known: {', '.join(models.names())}, "
                 f"or {TIMM_PREFIX}<name> for a timm model)", root)


def check_files(spec: RunSpec, root: str) -> None:
    """Data root and weight files must exist; relative paths resolve against the cwd.

    ``data.neighbours`` is not checked here: launch/cache_teacher.py and launch/neighbours.py
    load the config before that file exists; the training loader checks it when it opens it.
    """
    if spec.data.dataset != "synthetic":
        _must_exist("data.root", spec.data.root, root, directory=True)
    weights = [("model.weights", spec.model.weights)]
    if spec.teacher is not None:
        weights.append(("teacher.weights", spec.teacher.weights))
    for key, value in weights:
        if value is not None and not value.startswith("torchvision:"):
            _must_exist(key, value, root, directory=False)


def _must_exist(key: str, value: str, root: str, *, directory: bool) -> None:
    path = Path(value).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    kind = "directory" if directory else "file"
    ok = absolute.is_dir() if directory else absolute.is_file()
    if not ok:
        found = "not found" if not absolute.exists() else f"is not a {kind}"
        relative = "" if path.is_absolute() else " (relative paths resolve against the cwd)"
        fail(key, f"{kind} {found}: {absolute}{relative}", root)

