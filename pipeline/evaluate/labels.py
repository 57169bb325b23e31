"""Names that group runs in a study and a report: the method's label and the teacher→student pair.

Both come from a run's config (``spec.method``, the architectures) when a study tags its runs,
and from the run's MLflow params (the flattened config) when a report reads runs that were not
tagged, so the two spellings agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ARROW = "→"
DOTTED_PARTS = {"sample", "class_shape", "intervention"}  # cid.sample, ... (term names)


def method_label(method: Mapping[str, Any]) -> str:
    """``kd``; ``compose`` of fitnet and kd → ``fitnet+kd`` (KD last, as in "FitNet+KD");
    the MSE-trained vanilla network → ``vanilla-mse``."""
    name = str(method.get("name", "?"))
    if name == "compose":
        terms = list(method.get("terms") or {})
        rest = sorted(t for t in terms if t != "kd")
        return "+".join(rest + (["kd"] if "kd" in terms else [])) or "compose"
    if name == "vanilla" and str(method.get("objective", "ce")) not in ("ce", "None"):
        return f"vanilla-{method['objective']}"
    return name


def method_from_params(params: Mapping[str, str]) -> dict[str, Any]:
    """The parts of ``method`` that :func:`method_label` reads, from flattened MLflow params."""
    method: dict[str, Any] = {"name": params.get("method.name", "?")}
    if "method.objective" in params:
        method["objective"] = params["method.objective"]
    terms: dict[str, None] = {}
    for key in sorted(params):
        if key.startswith("method.terms."):
            rest = key[len("method.terms."):]
            # a term's name may hold dots (cid.class_shape): its options follow the name
            terms.setdefault(_term_name(rest), None)
    if terms:
        method["terms"] = terms
    return method


def _term_name(rest: str) -> str:
    """``cid.class_shape.beta`` → ``cid.class_shape`` when the flattened key is an option of
    that term; a term without options (``kd: {}``) is flattened to ``method.terms.kd``."""
    parts = rest.split(".")
    if len(parts) > 1 and parts[1] in DOTTED_PARTS:
        return ".".join(parts[:2])
    return parts[0]


def pair_label(teacher: str | None, student: str) -> str:
    """``resnet20→resnet8``; a run without a teacher is its student's name."""
    if teacher in (None, "", "None"):
        return student
    return f"{teacher}{ARROW}{student}"
