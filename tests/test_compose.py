"""The ``compose`` method: option parsing, term merging, attribute unions and eval routing."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.errors import ConfigError
from pipeline.distill.base import METHODS, MethodContext
from pipeline.distill.cid import (
    CIDClassShape,
    CIDIntervention,
    ClassShapeOptions,
    InterventionOptions,
)
from pipeline.distill.compose import Compose, ComposeOptions, merge_terms
from pipeline.distill.kd import KD, KDOptions
from pipeline.distill.losses import cross_entropy
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

C, D_S, D_T, B = 5, 4, 6, 10
CTX = MethodContext(C, D_S, D_T, epochs=4, steps_per_epoch=2)


def inputs(seed: int = 0) -> tuple[ModelOutput, TeacherOutput, Batch]:
    g = torch.Generator().manual_seed(seed)
    student = ModelOutput(torch.randn(B, C, generator=g), torch.randn(B, D_S, generator=g))
    teacher = TeacherOutput(
        logits=torch.randn(B, C, generator=g), embedding=torch.randn(B, D_T, generator=g)
    )
    y = torch.tensor([0, 1, 1, 2, 0, 4, 4, 4, 3, 1])
    return student, teacher, Batch(torch.zeros(B, 3, 2, 2), y, torch.arange(B), torch.zeros_like(y))


def test_parse_options_validates_each_term() -> None:
    raw = {"terms": {"kd": {"T": 4}, "cid.class_shape": {"beta": 1}}}
    opts = Compose.parse_options(raw, "method", "run.yaml")
    assert opts.terms == {"kd": KDOptions(T=4.0), "cid.class_shape": ClassShapeOptions(beta=1.0)}
    assert Compose.parse_options({"terms": {"kd": None}}, "method", "r.yaml").terms == {
        "kd": KDOptions()
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"terms": {"kd": {}, "cid.clas_shape": {"beta": 1}}},
            "run.yaml: method.terms.cid.clas_shape: unknown method 'cid.clas_shape'; "
            "did you mean 'cid.class_shape'?",
        ),
        (
            {"terms": {"kd": {"T": 4, "temp": 2}}},
            "run.yaml: unknown key 'method.terms.kd.temp'",
        ),
        ({"terms": {"kd": {"T": "hot"}}}, "run.yaml: method.terms.kd.T: expected float"),
        ({"terms": {"cid.sample": {"alpha": -1}}},
         "run.yaml: method.terms.cid.sample.alpha: expected a weight >= 0, found -1.0"),
        ({"terms": {}}, "run.yaml: method.terms: expected a non-empty mapping"),
        ({"term": {"kd": {}}}, "run.yaml: unknown key 'method.term'; did you mean 'method.terms'"),
        ({"terms": {"compose": {}}}, "unknown method 'compose'"),
    ],
)
def test_parse_options_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Compose.parse_options(raw, "method", "run.yaml")
    assert message in str(err.value)


def test_kd_plus_class_shape_terms_and_attributes() -> None:
    opts = ComposeOptions(terms={"kd": KDOptions(), "cid.class_shape": {"beta": 0.5}})
    method = METHODS.get("compose")(opts, CTX)
    student, teacher, batch = inputs()
    out = method(student, teacher, batch)
    assert set(out) == {"ce", "kd", "class_shape"}
    want = {
        **KD(KDOptions(), CTX)(student, teacher, batch),
        **CIDClassShape(ClassShapeOptions(0.5), CTX)(student, teacher, batch),
    }
    for key, value in want.items():
        assert torch.equal(out[key], value), key
    assert method.needs.teacher_fields == ("logits", "embedding")
    assert method.needs.needs_teacher and not method.needs.reads_stage_maps
    assert not method.needs.preact
    assert method.eval_logits(student) is student.logits
    assert list(method.terms.keys()) == ["kd", "cid__class_shape"]


def test_colliding_keys_are_prefixed_with_the_term_name() -> None:
    method = Compose(ComposeOptions(terms={"kd": KDOptions(), "vanilla": {}}), CTX)
    student, teacher, batch = inputs()
    out = method(student, teacher, batch)
    assert set(out) == {"kd.ce", "kd", "vanilla.ce"}
    assert torch.equal(out["vanilla.ce"], cross_entropy(student.logits, batch.labels))
    assert merge_terms([("a", {"x": 1}), ("b", {"y": 2})]) == {"x": 1, "y": 2}


def test_kd_plus_intervention_routes_eval_and_epochs() -> None:
    terms = {"kd": KDOptions(), "cid.intervention": InterventionOptions(warmup_epochs=1)}
    method = Compose(ComposeOptions(terms=terms), CTX)
    assert method.evaluator == "cid.intervention"
    assert method._ddp_params_and_buffers_to_ignore == [
        "terms.cid__intervention.acc_sum",
        "terms.cid__intervention.acc_weight",
    ]
    inter = method.terms["cid__intervention"]
    assert isinstance(inter, CIDIntervention)
    student, teacher, batch = inputs()
    method.start_epoch(0)
    assert set(method(student, teacher, batch)) == {"ce", "kd"}  # warm-up: no intervention CE
    assert method.eval_logits(student) is student.logits  # no centres used yet
    method.end_epoch(0)
    assert method.epoch_metrics() == {"centre_coverage": 1.0}
    method.start_epoch(1)
    assert inter.epoch == 1 and method.epoch == 1 and bool(inter.centres_ready)
    assert set(method(student, teacher, batch)) == {"ce", "kd", "intervention_ce"}
    torch.testing.assert_close(method.eval_logits(student), inter.eval_logits(student))
    assert not torch.allclose(method.eval_logits(student), student.logits)
    state = method.state_dict()
    assert (
        "terms.cid__intervention.ctx_used" in state
        and "terms.cid__intervention.g_new.weight" in state
    )


def test_no_decay_parameters_are_forwarded_and_two_evaluators_refused() -> None:
    method = Compose(ComposeOptions(terms={"kd": {}, "cid.sample": {"alpha": 2.0}}), CTX)
    W = method.terms["cid__sample"].W
    assert method.no_decay_parameters() == [W.weight, W.bias]
    with pytest.raises(ValueError, match="more than one term makes its own evaluation logits"):
        Compose(ComposeOptions(terms={"cid": {}, "cid.intervention": {}}), CTX)
    with pytest.raises(ValueError, match="at least one method"):
        Compose(ComposeOptions(terms={}), CTX)


def test_requirements_before_building() -> None:
    """What the trainer asks before building the method (which teacher fields to serve)."""
    shape = ComposeOptions(terms={"kd": KDOptions(), "cid.class_shape": ClassShapeOptions()})
    assert Compose.requirements(shape) == Requirements(
        needs_teacher=True, teacher_fields=("logits", "embedding"), preact=False)
    inter = ComposeOptions(terms={"kd": {}, "cid.intervention": {"centres": "teacher"}})
    assert Compose.requirements(inter).teacher_fields == ("logits", "embedding")
    alone = ComposeOptions(terms={"vanilla": {}, "cid.intervention": {}})
    assert Compose.requirements(alone).teacher_fields == ("logits",)
    assert Compose(alone, CTX).needs.teacher_fields == ("logits",)
