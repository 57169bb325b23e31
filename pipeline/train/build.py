"""Build a run's parts from its spec: data indices, student, teacher source, method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import RunSpec
from pipeline.data import DatasetIndex, build_index
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.models.base import Net, build_model


@dataclass
class RunData:
    train_index: DatasetIndex
    eval_indices: dict[str, DatasetIndex]
    num_classes: int


def build_data(spec: RunSpec) -> RunData:
    """The dataset indices of the training split and every evaluation split."""
    train_index = build_index(spec.data, spec.data.train_split)
    if spec.data.sampler == "coss" and spec.data.neighbours:
        from pipeline.teacher.neighbours import check_neighbours_source

        check_neighbours_source(spec.data.neighbours)
    eval_indices = {s: build_index(spec.data, s) for s in spec.data.eval_splits}
    return RunData(train_index, eval_indices, spec.data.num_classes or len(train_index.classes))


@dataclass
class RunParts:
    train_index: DatasetIndex
    eval_indices: dict[str, DatasetIndex]
    num_classes: int
    student: Net
    teacher: Any  # OnlineTeacher | CachedTeacher | None
    teacher_info: dict
    method: Method


def method_class(spec: RunSpec) -> type[Method]:
    import pipeline.distill  # noqa: F401  (fills the registry)

    return METHODS.get(spec.method["name"])


def method_options(spec: RunSpec) -> Any:
    opts = getattr(spec, "method_options", None)
    if opts is None:
        raw = {k: v for k, v in spec.method.items() if k != "name"}
        opts = method_class(spec).parse_options(raw, "method", "<spec>")
    return opts


def build_parts(
    spec: RunSpec,
    steps_per_epoch: int | None = None,
    load_teacher: bool = True,
    data: RunData | None = None,
) -> RunParts:
    """Student, teacher source and method (and the data indices, unless ``data`` has them)."""
    data = data or build_data(spec)
    train_index, eval_indices, num_classes = data.train_index, data.eval_indices, data.num_classes

    student = build_model(spec.model.arch, num_classes)
    if spec.model.weights:
        from pipeline.models.weights import load_weights_for

        load_weights_for(student, spec.model.weights, spec.model.arch, "model")

    cls = method_class(spec)
    opts = method_options(spec)
    teacher, teacher_info, teacher_dim = None, {}, None
    needs = cls.requirements(opts)
    if spec.teacher is not None and spec.teacher.arch and needs["needs_teacher"]:
        teacher, teacher_info = build_teacher_source(
            spec, needs, num_classes, load_teacher, train_index
        )
        teacher_dim = teacher.embedding_dim

    ctx = MethodContext(
        num_classes=num_classes,
        student_dim=student.embedding_dim,
        teacher_dim=teacher_dim,
        epochs=spec.optim.epochs,
        steps_per_epoch=steps_per_epoch or 1,
    )
    method = cls(opts, ctx)
    return RunParts(train_index, eval_indices, num_classes, student, teacher, teacher_info, method)


def build_teacher_source(
    spec: RunSpec, needs: dict[str, Any], num_classes: int, load: bool, index: DatasetIndex
):
    """The online teacher (the network) or, with ``teacher.source: cached``, the cache reader."""
    assert spec.teacher is not None
    fields = tuple(needs["teacher_fields"])
    if spec.teacher.source == "cached":
        from pipeline.teacher.cached import open_cached_teacher

        cached = open_cached_teacher(spec, fields, num_classes, index=index, preact=needs["preact"])
        return cached, {}
    from pipeline.teacher.online import OnlineTeacher, build_teacher_model

    model, info = build_teacher_model(spec.teacher, num_classes, load=load)
    return OnlineTeacher(model, fields, preact=needs["preact"]), info
