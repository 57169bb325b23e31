"""Rules a config must meet beyond names and types: value ranges, cross-field rules, paths.

Relative paths (``data.root``, ``model.weights``, ``teacher.weights``) resolve against the current
working directory, as everywhere in a config except ``base:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.coerce import fail, file_for
from pipeline.config.defaults import default_cache_dir
from pipeline.config.errors import ConfigError
from pipeline.config.layouts import layout_hint
from pipeline.config.ranges import check_ranges
from pipeline.config.schema import RunSpec
from pipeline.config.selection_checks import check_train_selection
from pipeline.config.timm_names import timm_problem
from pipeline.registry import Registry, closest

TIMM_PREFIX = "timm:"  # model.arch: timm:<name> builds timm.create_model(<name>)


def check_values(spec: RunSpec, method_cls: Any, root: str) -> None:
    """Rules that involve values, not just types."""
    data, optim = spec.data, spec.optim
    if not data.eval_splits:
        fail("data.eval_splits", "expected at least one split, found []", root)
    check_ranges(spec, root)  # every numeric key (pipeline/config/ranges.py)
    check_train_selection(data, root)
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
    needs_teacher = getattr(_requirements(method_cls, options), "needs_teacher", False)
    if needs_teacher and (teacher is None or not teacher.arch):
        name = spec.method["name"]
        raise ConfigError(
            f"{file_for('method.name', root)}: method {name!r} needs a teacher: set teacher.arch"
        )
    if teacher is not None and teacher.source == "cached":
        if data.views < 1:
            fail("teacher.source", "'cached' needs data.views = the K >= 1 views of the cache "
                 "(epoch e uses view e mod K), found data.views = 0 (a fresh view every epoch, "
                 "which only the online teacher can serve)", root)
        if not teacher.cache_dir:  # the writer's default (pipeline/config/defaults.py)
            teacher.cache_dir = default_cache_dir(spec)
    if teacher is not None and teacher.source == "cached" and data.ffcv_random_crop:
        fail("data.ffcv_random_crop", "expected false when teacher.source is 'cached': FFCV's own "
             "random crops are not the plan's views that the cache describes", root)
    check_rotations(spec, _requirements(method_cls, options), root)
    if not getattr(_requirements(method_cls, options), "uses_student", True):
        check_teacher_in_student_slot(spec, root)
    batch_stats = getattr(_requirements(method_cls, options), "teacher_batch_stats", False)
    if teacher is not None and teacher.source == "cached" and batch_stats:
        fail("teacher.source", f"expected 'online': method {spec.method['name']!r} runs the "
             "teacher's BatchNorm on each batch's statistics, which a cache cannot replay (for "
             "reviewkd set method.teacher_bn: eval to read a cache)", root)


def check_rotations(spec: RunSpec, needs: Any, root: str) -> None:
    """``data.rotations`` 0 becomes what the method reads (``Requirements.rotations``); an explicit
    value must agree with it: a method that reads rotated copies finds the four copies of each
    image interleaved in its batch, one that does not would read them as samples."""
    wanted = int(getattr(needs, "rotations", 1))
    data = spec.data
    if data.rotations == 0:
        data.rotations = wanted
    elif data.rotations not in (1, 4):
        fail("data.rotations", f"expected 0 (as the method asks), 1 or 4, found "
             f"{data.rotations}", root)
    elif data.rotations != wanted:
        fail("data.rotations", f"method {spec.method['name']!r} reads {wanted} rotation(s) of "
             f"each image, found data.rotations = {data.rotations}; leave it at 0 (as the "
             "method asks)", root)


def check_teacher_in_student_slot(spec: RunSpec, root: str) -> None:
    """A method that never runs the student (SSKD's and HSAKD's teacher phases) trains parts of
    the teacher; the network in the student slot is evaluated as loaded, so it must be the
    teacher: the same arch and weights, and the run's results are the teacher's."""
    t = spec.teacher
    if t is None or not t.arch:
        return  # "needs a teacher" is reported below
    for key, mine, theirs in (("model.arch", spec.model.arch, t.arch),
                              ("model.weights", spec.model.weights, t.weights)):
        if mine != theirs:
            fail(key, f"method {spec.method['name']!r} trains parts of the teacher and never "
                 f"runs the student, whose slot must hold the teacher (evaluated as loaded): "
                 f"expected {theirs!r} (teacher.{key.split('.')[1]}), found {mine!r}", root)


def _requirements(method_cls: Any, options: Any) -> Any:
    """The method's ``requirements(options)`` (a ``Requirements``; ``needs`` without options)."""
    if options is None or not hasattr(method_cls, "requirements"):
        return getattr(method_cls, "needs", None)
    return method_cls.requirements(options)


def check_archs(spec: RunSpec, models: Registry[Any], root: str) -> None:
    """``model.arch`` and ``teacher.arch`` name registered networks (or ``timm:<name>``)."""
    archs = [("model.arch", spec.model.arch)]
    if spec.teacher is not None and spec.teacher.arch:
        archs.append(("teacher.arch", spec.teacher.arch))
    for key, arch in archs:
        if arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX):
            problem = timm_problem(arch)  # imports timm only for a timm: arch
            if problem:
                fail(key, problem, root)
            continue
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
        _must_exist("data.root", spec.data.root, root, directory=True,
                    hint=layout_hint(spec.data.dataset))
    weights = [("model.weights", spec.model.weights)]
    if spec.teacher is not None:
        weights.append(("teacher.weights", spec.teacher.weights))
    for key, value in weights:
        if value is not None and not value.startswith("torchvision:"):
            _must_exist(key, value, root, directory=False)


def _must_exist(key: str, value: str, root: str, *, directory: bool, hint: str = "") -> None:
    path = Path(value).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    kind = "directory" if directory else "file"
    ok = absolute.is_dir() if directory else absolute.is_file()
    if not ok:
        found = "not found" if not absolute.exists() else f"is not a {kind}"
        relative = "" if path.is_absolute() else " (relative paths resolve against the cwd)"
        fail(key, f"{kind} {found}: {absolute}{relative}" + (f"; {hint}" if hint else ""), root)

