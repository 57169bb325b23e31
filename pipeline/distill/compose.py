"""``compose``: a method made of the loss terms of several registered methods.

Config::

    method:
      name: compose
      terms:
        kd: {T: 4}
        cid.class_shape: {beta: 1}

Each entry of ``terms`` names a registered method and holds its options, validated by that
method's own ``parse_options`` under the key ``method.terms.<name>``. One instance of each is
built; ``forward`` merges their term dicts without summing anything itself (the trainer sums).
A key returned by more than one term in the same step is prefixed with its term's name
(``kd.ce``, ``ipwd.ce``); keys that do not collide keep their names.

This reproduces the CID appendix experiments that add one CID component to a KD baseline:
``kd + cid.intervention`` ("+Intervention", appendix B, Table 1) and ``kd + cid.class_shape``
("+ClassRep", appendix C, Table 2).

The composite's requirements are the merge of its terms' (``requirements.merge``: the union
of teacher fields and stage maps; terms that read stage maps must agree on pre- vs
post-activation); every term is built with the same ``MethodContext`` and finds the stage maps
it selected among the merged ones by stage index. It evaluates with the one term that overrides
``eval_logits`` (more than one is an error), and forwards ``start_epoch``, ``end_epoch``,
``set_phase``, ``no_decay_parameters`` and ``epoch_metrics`` to every term.

Phases: at most one term may declare initial phases (AB's or FT's pre-training); during such a
phase only that term contributes, so ``kd + ab`` pre-trains AB's connectors alone and then
trains CE + KD, as RepDistiller does.

Cross-entropy on the student's head: the baselines return it too (``ce_weight``, 1 by default,
for the CRD-paper form CE + β·L); a composite in which more than one term has a positive
``ce_weight`` would count it twice and is refused when the config is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from pipeline.distill.base import MAIN_PHASE, METHODS, Method, MethodContext, Phase
from pipeline.distill.requirements import Requirements, merge
from pipeline.registry import closest
from pipeline.types import Batch, ModelOutput, TeacherOutput

RANK_LOCAL_ATTR = "RANK_LOCAL_BUFFERS"


def mark_rank_local_buffers(module: nn.Module) -> list[str]:
    """Tell DistributedDataParallel not to broadcast the rank-local buffers under ``module``.

    A sub-module lists in its ``RANK_LOCAL_BUFFERS`` class attribute the buffers that hold this
    process's partial sums (CID's centre accumulators): DDP's default ``broadcast_buffers=True``
    would overwrite them with rank 0's at every forward. Their dotted names relative to
    ``module`` go into ``module._ddp_params_and_buffers_to_ignore``, which DDP reads when it
    wraps ``module`` itself (torch's documented workaround, pytorch issue 43690). Call it on the
    module that is wrapped (the trainer's ``Distiller``), before wrapping. Returns the names.
    """
    names = [
        f"{prefix}.{buf}" if prefix else buf
        for prefix, sub in module.named_modules()
        for buf in getattr(type(sub), RANK_LOCAL_ATTR, ())
    ]
    module._ddp_params_and_buffers_to_ignore = names  # type: ignore[assignment]
    return names


def module_key(name: str) -> str:
    """A method name as an ``nn.ModuleDict`` key ('.' is not allowed): ``cid.sample`` →
    ``cid__sample``."""
    return name.replace(".", "__")


def overrides_eval_logits(method: Method) -> bool:
    return type(method).eval_logits is not Method.eval_logits


def merge_terms(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge named dicts; a key present in more than one becomes ``<part name>.<key>``."""
    counts = Counter(key for _, values in parts for key in values)
    merged: dict[str, Any] = {}
    for name, values in parts:
        for key, value in values.items():
            merged[f"{name}.{key}" if counts[key] > 1 else key] = value
    return merged


def _term_specs(opts: Any) -> dict[str, tuple[type[Method], Any]]:
    """Each term's method class and ``Options`` (raw dicts are turned into ``Options``)."""
    if not opts.terms:
        raise ValueError("method.terms: expected at least one method, found none")
    specs: dict[str, tuple[type[Method], Any]] = {}
    for name, options in opts.terms.items():
        if name == "compose":
            raise ValueError("method.terms: a compose method cannot contain 'compose'")
        method_cls = METHODS.get(name)
        if isinstance(options, dict):
            options = method_cls.Options(**options)
        specs[name] = (method_cls, options)
    return specs


@dataclass
class ComposeOptions:
    """Config keys of ``method: {name: compose, ...}``: ``terms`` maps registered method names
    to their options (parsed ``Options`` instances, or raw dicts when built directly)."""

    terms: dict[str, Any] = field(default_factory=dict)


@METHODS.register("compose")
class Compose(Method):
    """The sum of several methods' loss terms (the trainer does the summing)."""

    Options = ComposeOptions

    @classmethod
    def parse_options(cls, raw: dict[str, Any], where: str, file: str) -> ComposeOptions:
        from pipeline.config.coerce import describe, fail, join, unknown_key

        if not isinstance(raw, dict):
            fail(where, f"expected a mapping with the key 'terms', found {describe(raw)}", file)
        for key in raw:
            if key != "terms":
                unknown_key(key, ["terms"], where, file)
        terms_key = join(where, "terms")
        terms = raw.get("terms")
        if not isinstance(terms, dict) or not terms:
            fail(
                terms_key,
                "expected a non-empty mapping from method names to their options, found "
                f"{describe(terms)}",
                file,
            )
        known = [name for name in METHODS.names() if name != "compose"]
        for name in terms:
            if not isinstance(name, str) or name not in known:
                hint = closest(str(name), known)
                tail = f"; did you mean {hint!r}?" if hint else f" (known: {', '.join(known)})"
                fail(join(terms_key, name), f"unknown method {name!r}{tail}", file)
        parsed: dict[str, Any] = {}
        for name, options in terms.items():
            parsed[name] = METHODS.get(name).parse_options(
                {} if options is None else options, join(terms_key, name), file
            )
        return ComposeOptions(terms=parsed)

    @classmethod
    def check_run(cls, opts: ComposeOptions, epochs: int) -> None:
        specs = _term_specs(opts)
        for name, (method, o) in specs.items():
            try:
                method.check_run(o, epochs)
            except ValueError as err:
                raise ValueError(f"terms.{name}.{err}") from err
        with_ce = [n for n, (_, o) in specs.items() if getattr(o, "ce_weight", 0) > 0]
        if len(with_ce) > 1:
            raise ValueError(
                f"terms.{with_ce[1]}.ce_weight: terms {with_ce} each add the cross-entropy on the "
                "student's head, which would count it twice; set ce_weight: 0 on all but one")
        phased = [n for n, (method, o) in specs.items() if method.phases(o)]
        if len(phased) > 1:
            raise ValueError(f"terms: more than one term has initial phases: {phased}; keep one")
        cls.requirements(opts)  # disagreeing terms are a config error too

    @classmethod
    def requirements(cls, opts: ComposeOptions) -> Requirements:
        """The merge of the terms' requirements (see ``requirements.merge``)."""
        return merge((name, method.requirements(o))
                     for name, (method, o) in _term_specs(opts).items())

    @classmethod
    def phases(cls, opts: ComposeOptions) -> tuple[Phase, ...]:
        return tuple(p for method, o in _term_specs(opts).values() for p in method.phases(o))

    def __init__(self, opts: ComposeOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        specs = _term_specs(opts)
        self.term_names: list[str] = list(specs)
        self.terms = nn.ModuleDict()
        for name, (method_cls, options) in specs.items():
            key = module_key(name)
            if key in self.terms:
                raise ValueError(f"method.terms: {name!r} clashes with another term's key {key!r}")
            self.terms[key] = method_cls(options, ctx)
        parts = self._parts()
        evaluators = [(n, m) for n, m in parts if overrides_eval_logits(m)]
        if len(evaluators) > 1:
            raise ValueError(
                "method.terms: more than one term makes its own evaluation logits: "
                f"{[n for n, _ in evaluators]}; keep one"
            )
        self.evaluator: str | None = evaluators[0][0] if evaluators else None
        mark_rank_local_buffers(self)

    def _parts(self) -> list[tuple[str, Method]]:
        return [(name, self.terms[module_key(name)]) for name in self.term_names]  # type: ignore[misc]

    def _active(self) -> list[tuple[str, Method]]:
        """The terms that train in the current phase: all of them in the main phase, the one
        that declared an initial phase during it."""
        if self.phase == MAIN_PHASE:
            return self._parts()
        return [(n, m) for n, m in self._parts()
                if any(p.name == self.phase for p in type(m).phases(m.opts))]

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        return merge_terms([(n, m(student, teacher, batch)) for n, m in self._active()])

    def set_phase(self, name: str) -> None:
        super().set_phase(name)
        for _, m in self._parts():
            m.set_phase(name)

    def phase_parameters(self, phase: Phase, student: nn.Module) -> list[nn.Parameter]:
        # by name: the trainer's copy of the phase has its LR filled in (``PhasePlan``)
        owners = [m for n, m in self._parts()
                  if any(p.name == phase.name for p in type(m).phases(m.opts))]
        return owners[0].phase_parameters(phase, student)

    def eval_logits(self, student: ModelOutput) -> Tensor:
        if self.evaluator is None:
            return student.logits
        return self.terms[module_key(self.evaluator)].eval_logits(student)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        for _, m in self._parts():
            m.start_epoch(epoch)

    def end_epoch(self, epoch: int) -> None:
        for _, m in self._parts():
            m.end_epoch(epoch)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self._parts() for p in m.no_decay_parameters()]

    def epoch_metrics(self) -> dict[str, float]:
        return merge_terms([(n, m.epoch_metrics()) for n, m in self._parts()])

    def lineage_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        for _, m in self._parts():
            tags.update(m.lineage_tags())
        return tags

    def sync_for_checkpoint(self) -> None:
        """Forward to the terms that keep rank-local sums (see ``cid.CIDIntervention``)."""
        for _, m in self._parts():
            sync = getattr(m, "sync_for_checkpoint", None)
            if sync is not None:
                sync()
