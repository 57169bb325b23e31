"""Build a run's parts from its spec: data indices, student, teacher source, method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config.schema import RunSpec
from pipeline.data import DatasetIndex, build_index, build_train_index
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.requirements import Requirements
from pipeline.models.base import Net, build_model


@dataclass
class RunData:
    train_index: DatasetIndex
    eval_indices: dict[str, DatasetIndex]
    num_classes: int


def build_data(spec: RunSpec) -> RunData:
    """The dataset indices of the training split and every evaluation split."""
    train_index = build_train_index(spec.data)
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
    """Student, teacher source and method (and the data indices, unless ``data`` has them).
    ``load_teacher`` False (a dry run): no weights file is read, the model's neither."""
    data = data or build_data(spec)
    train_index, eval_indices, num_classes = data.train_index, data.eval_indices, data.num_classes

    student = build_model(spec.model.arch, num_classes)
    if spec.model.weights and load_teacher:  # a dry run (load_teacher False) reads no weights
        from pipeline.models.weights import load_weights_for

        load_weights_for(student, spec.model.weights, spec.model.arch, "model")

    cls = method_class(spec)
    opts = method_options(spec)
    needs = cls.requirements(opts)
    size = spec.data.image_size
    teacher, teacher_info, teacher_dim, teacher_stages, teacher_parts = None, {}, None, (), None
    if spec.teacher is not None and spec.teacher.arch and needs.needs_teacher:
        epochs = spec.optim.epochs + sum(p.epochs for p in cls.phases(opts))
        teacher, teacher_info = build_teacher_source(
            spec, needs, num_classes, load_teacher, train_index, epochs
        )
        teacher_dim, teacher_stages = teacher.embedding_dim, teacher.stage_info
        teacher_parts = teacher.parts

    ctx = MethodContext(
        num_classes=num_classes,
        student_dim=student.embedding_dim,
        teacher_dim=teacher_dim,
        epochs=spec.optim.epochs,
        steps_per_epoch=steps_per_epoch or 1,
        student_stages=student.stage_info(size),
        teacher_stages=teacher_stages,
        num_train_samples=len(train_index),
        train_labels=torch.from_numpy(train_index.labels),
        image_size=size,
        teacher_parts=teacher_parts,
        load_teacher=load_teacher,
        student_arch=spec.model.arch,
        teacher_arch=spec.teacher.arch if spec.teacher is not None and teacher else "",
        teacher_weights=spec.teacher.weights if spec.teacher is not None and teacher else None,
    )
    method = cls(opts, ctx)
    return RunParts(train_index, eval_indices, num_classes, student, teacher, teacher_info, method)


def teacher_network(spec: RunSpec, num_classes: int, load: bool) -> tuple[Net, dict]:
    """The teacher network (with its weights unless ``load`` is False)."""
    from pipeline.teacher.online import build_teacher_model

    assert spec.teacher is not None
    return build_teacher_model(spec.teacher, num_classes, load=load)


def build_teacher_source(
    spec: RunSpec, needs: Requirements, num_classes: int, load: bool, index: DatasetIndex,
    epochs: int | None = None,
):
    """The online teacher (the network) or, with ``teacher.source: cached``, the cache reader.

    Either way the source knows the teacher's ``stage_info`` (from a probe of the network, built
    without weights for a cache) and serves just the stages ``needs`` selects, and its ``parts``
    hold the ``needs.teacher_modules`` taken from the teacher's weights (for a cache, the network
    is then built with its weights too; the cache itself never stores them).
    """
    from pipeline.teacher.parts import extract_teacher_parts

    assert spec.teacher is not None
    size = spec.data.image_size
    if spec.teacher.source == "cached":
        from pipeline.teacher.cached import open_cached_teacher

        net = teacher_network(spec, num_classes, load=load and bool(needs.teacher_modules))[0]
        stages = net.stage_info(size)
        selected = needs.resolve_teacher(len(stages))
        cached = open_cached_teacher(
            spec, needs.teacher_outputs, num_classes, index=index, preact=needs.teacher_preact,
            stages=selected, epochs=epochs)
        cached.stage_info = stages
        cached.parts = extract_teacher_parts(net, needs.teacher_modules, selected)
        return cached, {}
    from pipeline.teacher.online import OnlineTeacher

    model, info = teacher_network(spec, num_classes, load)
    stage_info = model.stage_info(size)
    selected = needs.resolve_teacher(len(stage_info))
    teacher = OnlineTeacher(model, needs.teacher_fields, stages=selected,
                            preact=needs.teacher_preact, batch_stats=needs.teacher_batch_stats)
    teacher.stage_info = stage_info
    teacher.parts = extract_teacher_parts(model, needs.teacher_modules, selected)
    return teacher, info
