"""Pre- vs post-activation stage maps chosen per network (``student_preact`` / ``teacher_preact``):
ReviewKD's CIFAR form reads the student's maps after the ReLU and the teacher's before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipeline.distill.base import Method, MethodContext
from pipeline.distill.requirements import Requirements, merge
from pipeline.models import build_model
from pipeline.train.distiller import Distiller
from pipeline.types import Batch, ModelOutput, TeacherOutput


def test_preact_sets_both_sides_and_each_side_can_differ() -> None:
    both = Requirements(student_stages=(1,), teacher_stages=(1,), preact=True)
    assert both.student_preact and both.teacher_preact and both.preact
    mixed = Requirements(student_stages=(1,), teacher_stages=(1,), teacher_preact=True)
    assert not mixed.student_preact and mixed.teacher_preact and not mixed.preact
    override = Requirements(student_stages=(1,), preact=True, student_preact=False)
    assert not override.student_preact and override.teacher_preact and not override.preact
    assert Requirements() == Requirements(preact=False, student_preact=False, teacher_preact=False)


def test_merge_agrees_per_side() -> None:
    review = Requirements(student_stages=("all",), teacher_stages=("all",), teacher_preact=True)
    student_only_post = Requirements(student_stages=(2,))
    teacher_only_pre = Requirements(teacher_stages=(3,), preact=True)
    merged = merge([("reviewkd", review), ("a", student_only_post), ("b", teacher_only_pre)])
    assert not merged.student_preact and merged.teacher_preact and not merged.preact
    with pytest.raises(ValueError, match="read student stage maps disagree on preact"):
        merge([("reviewkd", review), ("pre", Requirements(student_stages=(1,), preact=True))])
    with pytest.raises(ValueError, match="read teacher stage maps disagree on preact"):
        merge([("reviewkd", review), ("post", Requirements(teacher_stages=(1,)))])
    # A side no term reads follows the other one (the old single flag's behaviour).
    only_student = merge([("pre", Requirements(student_stages=(1,), preact=True)),
                          ("kd", Requirements())])
    assert only_student.student_preact and only_student.teacher_preact and only_student.preact


class _Echo(Method):
    """Returns the student's stage maps as its terms (to see which flavour arrived)."""

    Options = dict
    needs = Requirements(student_stages=(1, 2), teacher_stages=(1, 2), teacher_preact=True)

    def forward(self, student: ModelOutput, teacher: TeacherOutput | None,  # type: ignore[override]
                batch: Batch) -> dict[str, Tensor]:
        assert student.feats is not None
        return {f"s{k}": v for k, v in student.feats.items()}


def test_student_and_teacher_get_their_own_flavour(tmp_path: Path) -> None:
    """The Distiller runs the student post-activation, the teacher source (online and the cache
    check) pre-activation, for one method."""
    from pipeline.catalog import load_run_config
    from pipeline.data import build_index
    from pipeline.train.build import build_teacher_source
    from tests.conftest import ROOT

    torch.manual_seed(0)
    net = build_model("resnet8", 10).eval()
    ctx = MethodContext(10, 64, 64, epochs=1, steps_per_epoch=1,
                        student_stages=net.stage_info(32), teacher_stages=net.stage_info(32))
    x = torch.randn(2, 3, 32, 32)
    got = Distiller(net, _Echo({}, ctx))(x, None, Batch(x, torch.zeros(2), torch.arange(2),
                                                         torch.zeros(2)))
    post = net(x, feats=(1, 2)).feats
    pre = net(x, feats=(1, 2), preact=True).feats
    assert not torch.equal(post[1], pre[1])
    assert torch.equal(got["s1"], post[1]) and torch.equal(got["s2"], post[2])

    spec = load_run_config(ROOT / "configs/demo/kd.yaml", [
        "data.dataset=synthetic", "data.synthetic_size=4", "teacher.weights=null",
        "teacher.arch=resnet8", f"run_dir={tmp_path}"], check_paths=False)
    index = build_index(spec.data, "train")
    teacher, _ = build_teacher_source(spec, _Echo.needs, 10, False, index)
    assert teacher.preact and teacher.stages == (1, 2)
    teacher.model.load_state_dict(net.state_dict())
    out = teacher(Batch(x, torch.zeros(2), torch.arange(2), torch.zeros(2)), x)
    assert torch.equal(out.feats[1], pre[1]) and torch.equal(out.feats[2], pre[2])
