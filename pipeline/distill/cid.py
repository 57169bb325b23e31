"""CID: Deng & Zhang, NeurIPS 2021, "Comprehensive Knowledge Distillation with Causal
Intervention" (specs/methods.md §1; the maths is in ``cid_terms``).

Four registered methods, the last built from the first three:

- ``cid.sample``: α·NM_MSE(W h_s + b, h_t), eqs. 1 and 3. W = Linear(d_s, d_t) **with** bias
  (the code; the paper writes h_sᵀW), no weight decay. ``loss: mse`` is the "CID_mse" ablation.
- ``cid.class_shape``: β·class-shape loss on raw h_s and h_t, eqs. 2–3 as the code computes it.
- ``cid.intervention``: weight·CE(g_new([h_s ; context]), y), eqs. 4–7, with the class centres
  of eq. 5 as the context bases. No KL: pair it with ``kd`` (``compose``) for the appendix's
  "+Intervention" experiments, or use ``cid``.
- ``cid``: the whole method, eq. 8 with the schedule of the code (spec §1.2.5):
  warm-up epochs: aa·KL + α·L_sample + β·L_class (no CE anywhere);
  afterwards: aa·(CE(z_new, y) + KL) + α·L_sample + β·L_class,
  KL = T²·KL(σ(z_t/T) ‖ σ(z_s/T)) on the student's original head, its only training signal.
  Terms: ``kl``, ``sample``, ``class_shape``, ``intervention_ce``. Ablations ``use_sample``,
  ``use_class``, ``use_intervention`` (Fig. 6): without intervention the regular P(Y|X) is
  used, i.e. ``ce`` = aa·CE(z_s, y) on the original head in every epoch (our reading of
  "w/o INV"; the code has no such switch).

Class centres (spec §1.3, code ``train_distill_context``): during each epoch from the last
warm-up epoch on, c̄_i accumulates Σ w_j h_j / Σ w_j over the samples of class i with w_j =
σ(z_t/T)[y_j] and h_j the detached student embedding of the current forward pass
(``centres: teacher`` uses h_t instead; then g_new takes [h_s ; context] of size d_s + d_t).
``end_epoch`` sums the accumulators over all processes and divides; a class with no weight
anywhere keeps its previous centre. Epoch e trains with the centres computed in epoch e − 1.

Evaluation (spec §1.4): g_new([h_s ; σ(z_s/T) @ ctx_used]) with ctx_used the centres of the
last training epoch, as the code's ``context_old``. The new centres are held in ``ctx_next``
and take over at the next ``start_epoch``, so evaluation always uses the centres g_new was
trained with, whether the trainer evaluates before or after ``end_epoch``. Until centres have
been used (``centres_ready``), evaluation uses the student's own logits: the code's accuracy
during warm-up (zero context, untrained g_new) is meaningless.

Warm-up: ``warmup_epochs = -1`` means the code's 20 of 240 epochs scaled to the run,
floor(20/240·epochs + 0.5), at least 1 when epochs > 1 and 0 for a one-epoch run; epochs are
0-based and warm-up is ``epoch < warmup_epochs``. With 0 warm-up epochs the first epoch trains
g_new with zero context (no centres exist yet).

Paper vs code (spec §1): the defaults follow the code; the paper's readings are options:
``bias`` (W without bias), ``reduction: sum`` (eq. 3's class sum), ``prior_factor`` (eq. 7's
P(c_i): ``true`` for 1/C, ``frequency`` for "the percentage of the samples in class c_i" measured
on the run's training set, which differs from 1/C on a data-limited or class-dropped set),
``context: full`` (eqs. 4/6 instead of the NWGM of eq. 7), ``centres: teacher`` (eq. 5 is
ambiguous about whose features) and ``warmup_epochs: 0`` (no warm-up in the paper).

``prior_factor: frequency`` needs the training labels: they are read from
``MethodContext.train_labels`` at construction (or given later to ``use_train_labels``), and
P(c_i) is stored in the buffer ``class_prior``, saved with the method's state.

Process notes: the accumulators are per-process partial sums. DDP's buffer broadcast must skip
them: call ``compose.mark_rank_local_buffers`` on the module DDP wraps (``end_epoch`` raises on
every process if they were overwritten). ``sync_for_checkpoint`` (a collective) folds them into
rank 0 before a mid-epoch checkpoint, and loading a state dict on a rank other than 0 zeroes
them, so a resume from rank 0's checkpoint counts every sample once. During warm-up g_new gets
no gradient, so DDP needs ``find_unused_parameters=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.dist import all_reduce_sum, is_distributed, rank
from pipeline.distill.base import METHODS, Method, MethodContext
from pipeline.distill.cid_terms import (
    accumulate_centres,
    class_frequencies,
    class_shape_loss,
    context_coefficients,
    finalize_centres,
    interventional_logits,
    nm_mse,
    plain_mse,
    true_class_weights,
)
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.distill.losses import cross_entropy, kd_loss
from pipeline.distill.options import check_choice, check_temperature, check_weights
from pipeline.distill.requirements import Requirements
from pipeline.types import Batch, ModelOutput, TeacherOutput

CODE_WARMUP, CODE_EPOCHS = 20, 240  # init_epochs and epochs of the authors' CIFAR-100 runs


def _check_weights(opts: Any, keys: tuple[str, ...]) -> None:
    check_weights(opts, *keys)


_check_choice = check_choice


def _check_intervention(opts: Any) -> None:
    check_temperature(opts.T)
    if opts.warmup_epochs < -1:
        raise ValueError(f"warmup_epochs: expected -1 (auto) or >= 0, found {opts.warmup_epochs}")
    _check_choice(opts, "centres", ("student", "teacher"))
    _check_choice(opts, "context", ("nwgm", "full"))
    if opts.prior_factor not in (False, True, "frequency"):
        raise ValueError(f"prior_factor: expected false (the code), true (1/C) or 'frequency' "
                         f"(measured class frequencies), found {opts.prior_factor!r}")


def auto_warmup_epochs(epochs: int) -> int:
    """The code's 20 warm-up epochs of 240 scaled to ``epochs`` (rounded half up), at least 1
    when epochs > 1, and 0 for a single epoch."""
    if epochs <= 1:
        return 0
    return max(1, math.floor(CODE_WARMUP / CODE_EPOCHS * epochs + 0.5))


def warmup_for(option: int, epochs: int) -> int:
    """The warm-up epochs of a run of ``epochs``: ``option``, or the auto rule for -1."""
    return auto_warmup_epochs(epochs) if option < 0 else option


def check_warmup(option: int, epochs: int) -> None:
    """ValueError when the warm-up leaves no epoch to train the interventional classifier."""
    warmup = warmup_for(option, epochs)
    if epochs > 0 and warmup >= epochs:
        raise ValueError(f"warmup_epochs: {warmup} leaves none of the {epochs} epochs to train "
                         "the interventional classifier")


def _teacher_tensor(teacher: TeacherOutput | None, field: str, method: str) -> Tensor:
    value = None if teacher is None else getattr(teacher, field)
    if value is None:
        raise ValueError(f"method {method}: expected the teacher's {field}, found none")
    return value


@dataclass
class SampleOptions:
    """Config keys of ``cid.sample``."""

    alpha: float = 10.0  # resnet56 → resnet20 (spec §1.5); no universal default exists
    loss: Literal["nm_mse", "mse"] = "nm_mse"
    bias: bool = True  # W's bias: the code has one, the paper's h_sᵀW has none

    def __post_init__(self) -> None:
        _check_weights(self, ("alpha",))
        _check_choice(self, "loss", ("nm_mse", "mse"))


@METHODS.register("cid.sample")
class CIDSample(Method):
    """α·NM_MSE(W h_s + b, h_t) (eqs. 1, 3). Term: ``sample``."""

    Options = SampleOptions
    needs = Requirements(teacher_fields=("embedding",))

    def __init__(self, opts: SampleOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if ctx.teacher_dim is None:
            raise ValueError("method cid.sample: needs the teacher's embedding size, found none")
        self.W = nn.Linear(ctx.student_dim, ctx.teacher_dim, bias=opts.bias)
        self.loss_fn = nm_mse if opts.loss == "nm_mse" else plain_mse

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        h_t = _teacher_tensor(teacher, "embedding", "cid.sample")
        return {"sample": self.opts.alpha * self.loss_fn(self.W(student.embedding), h_t)}

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.W.parameters())


@dataclass
class ClassShapeOptions:
    """Config keys of ``cid.class_shape``."""

    beta: float = 1.0  # resnet56 → resnet20 (spec §1.5); no universal default exists
    reduction: Literal["mean", "sum"] = "mean"  # the code, or the paper's eq. 3 (cid_terms)

    def __post_init__(self) -> None:
        _check_weights(self, ("beta",))
        _check_choice(self, "reduction", ("mean", "sum"))


@METHODS.register("cid.class_shape")
class CIDClassShape(Method):
    """β·class-shape loss on the raw student and teacher embeddings (eqs. 2–3). Term:
    ``class_shape``."""

    Options = ClassShapeOptions
    needs = Requirements(teacher_fields=("embedding",))

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        h_t = _teacher_tensor(teacher, "embedding", "cid.class_shape")
        loss = class_shape_loss(student.embedding, h_t, batch.labels, self.opts.reduction)
        return {"class_shape": self.opts.beta * loss}


@dataclass
class InterventionOptions:
    """Config keys of ``cid.intervention``."""

    weight: float = 1.0  # aa
    T: float = 4.0  # coefficients σ(z_s/T) and centre weights σ(z_t/T)
    warmup_epochs: int = -1  # -1: auto (module docstring)
    centres: Literal["student", "teacher"] = "student"
    # P(c_i) in the context: false (the code: none), true (1/C), frequency (measured, the paper)
    prior_factor: bool | Literal["frequency"] = False
    context: Literal["nwgm", "full"] = "nwgm"  # eq. 7 (code) or eqs. 4/6

    def __post_init__(self) -> None:
        _check_weights(self, ("weight",))
        _check_intervention(self)


@METHODS.register("cid.intervention")
class CIDIntervention(Method):
    """weight·CE(g_new([h_s ; context]), y) after warm-up (eqs. 4–7), with the class centres
    kept across epochs. Term: ``intervention_ce``."""

    Options = InterventionOptions
    RANK_LOCAL_BUFFERS = ("acc_sum", "acc_weight")

    @classmethod
    def requirements(cls, opts: InterventionOptions) -> Requirements:
        fields = ("logits", "embedding") if opts.centres == "teacher" else ("logits",)
        return Requirements(teacher_fields=fields)

    @classmethod
    def check_run(cls, opts: InterventionOptions, epochs: int) -> None:
        check_warmup(opts.warmup_epochs, epochs)

    def __init__(self, opts: InterventionOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        if opts.centres == "teacher" and ctx.teacher_dim is None:
            raise ValueError(
                "method cid.intervention: centres 'teacher' needs the teacher's embedding size, "
                "found none"
            )
        d_ctx = ctx.student_dim if opts.centres == "student" else int(ctx.teacher_dim or 0)
        self.check_run(opts, ctx.epochs)
        self.warmup_epochs = warmup_for(opts.warmup_epochs, ctx.epochs)
        C = ctx.num_classes
        self.g_new = nn.Linear(ctx.student_dim + d_ctx, C)
        self.register_buffer("ctx_used", torch.zeros(C, d_ctx))
        self.register_buffer("ctx_next", torch.zeros(C, d_ctx))
        self.register_buffer("acc_sum", torch.zeros(C, d_ctx))
        self.register_buffer("acc_weight", torch.zeros(C))
        self.register_buffer("centres_ready", torch.tensor(False))
        self.register_buffer("next_ready", torch.tensor(False))
        if opts.prior_factor == "frequency":  # NaN until the training labels are given
            self.register_buffer("class_prior", torch.full((C,), float("nan")))
            labels = getattr(ctx, "train_labels", None)
            if labels is not None:
                self.use_train_labels(labels)
        self.coverage: float | None = None
        # What this process added to acc_weight, outside the buffers: end_epoch checks that no
        # one else (DDP's buffer broadcast) changed them.
        self.own_weight = torch.zeros(C)
        self.register_load_state_dict_post_hook(_after_loading)
        mark_rank_local_buffers(self)

    def use_train_labels(self, labels: Any) -> None:
        """P(c_i) = the class frequencies of the run's training labels, for ``prior_factor:
        frequency`` (a no-op otherwise)."""
        if self.opts.prior_factor == "frequency":
            freqs = class_frequencies(torch.as_tensor(labels), self.ctx.num_classes)
            self.class_prior.copy_(freqs.to(self.class_prior.device))

    def _prior(self) -> Tensor | None:
        return self.class_prior if self.opts.prior_factor == "frequency" else None

    def accumulating(self) -> bool:
        """Centres accumulate from the last warm-up epoch on (the code starts there too)."""
        return self.epoch >= self.warmup_epochs - 1

    def logits(self, student: ModelOutput, centres: Tensor) -> Tensor:
        o, h = self.opts, student.embedding
        coeffs = context_coefficients(student.logits, o.T)
        return interventional_logits(self.g_new, h, coeffs, centres, o.context,
                                     o.prior_factor is True, self._prior())

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        z_t = _teacher_tensor(teacher, "logits", "cid.intervention")
        if self.training and self.accumulating():
            if self.opts.centres == "student":
                feats = student.embedding
            else:
                feats = _teacher_tensor(teacher, "embedding", "cid.intervention")
            weights = true_class_weights(z_t, batch.labels, self.opts.T)
            accumulate_centres(self.acc_sum, self.acc_weight, feats, batch.labels, weights)
            self.own_weight = self.own_weight.to(weights.device)
            self.own_weight.index_add_(0, batch.labels.long(), weights)
        if self.epoch < self.warmup_epochs:
            return {}
        z_new = self.logits(student, self.ctx_used)
        return {"intervention_ce": self.opts.weight * cross_entropy(z_new, batch.labels)}

    def eval_logits(self, student: ModelOutput) -> Tensor:
        if not bool(self.centres_ready):
            return student.logits
        return self.logits(student, self.ctx_used)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        prior = self._prior()
        if prior is not None and bool(torch.isnan(prior).any()):
            raise ValueError("method cid: prior_factor 'frequency' needs the training labels "
                             "(use_train_labels), found none")
        if bool(self.next_ready):
            self.ctx_used.copy_(self.ctx_next)
            self.centres_ready.fill_(True)

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        if not self.accumulating():
            return
        own = self.own_weight.to(self.acc_weight.device)
        changed = (~torch.isclose(own, self.acc_weight, rtol=1e-4, atol=1e-6)).any().float()
        if all_reduce_sum(changed.reshape(1)).item() > 0:  # collective: every process raises
            raise RuntimeError(
                "cid.intervention: the centre accumulators were overwritten between steps, most "
                "likely by DistributedDataParallel's buffer broadcast; call pipeline.distill."
                "compose.mark_rank_local_buffers(module) on the module DDP wraps, before wrapping"
            )
        all_reduce_sum(self.acc_sum)
        all_reduce_sum(self.acc_weight)
        seen = self.acc_weight > 0
        self.coverage = float(seen.float().mean())
        if bool(seen.any()):
            self.ctx_next.copy_(finalize_centres(self.acc_sum, self.acc_weight, self.ctx_next))
            self.next_ready.fill_(True)
        self.acc_sum.zero_()
        self.acc_weight.zero_()
        self.own_weight.zero_()

    def epoch_metrics(self) -> dict[str, float]:
        """Fraction of classes that received a centre at the last ``end_epoch``."""
        return {} if self.coverage is None else {"centre_coverage": self.coverage}

    @torch.no_grad()
    def sync_for_checkpoint(self) -> None:
        """Collective: move every process's partial sums into rank 0's (the totals do not
        change), so rank 0's state dict holds the whole epoch so far. Call on every process
        before saving a mid-epoch checkpoint from rank 0."""
        if not is_distributed():
            return
        all_reduce_sum(self.acc_sum)
        all_reduce_sum(self.acc_weight)
        if rank() != 0:
            self.acc_sum.zero_()
            self.acc_weight.zero_()
        self.own_weight = self.acc_weight.clone()


def _after_loading(module: nn.Module, incompatible: Any) -> None:
    """A checkpoint holds rank 0's partial sums: only rank 0 keeps them on loading."""
    if is_distributed() and rank() != 0:
        module.acc_sum.zero_()  # type: ignore[operator]
        module.acc_weight.zero_()  # type: ignore[operator]
    module.own_weight = module.acc_weight.clone()  # type: ignore[operator]


@dataclass
class CIDOptions:
    """Config keys of ``cid`` (defaults: the resnet56 → resnet20 row of spec §1.5 for α and β,
    which have no universal value; T = 4 and aa = 1 for every pair in the code)."""

    alpha: float = 10.0
    beta: float = 1.0
    aa: float = 1.0
    T: float = 4.0
    use_sample: bool = True
    use_class: bool = True
    use_intervention: bool = True
    sample_loss: Literal["nm_mse", "mse"] = "nm_mse"
    sample_bias: bool = True
    class_reduction: Literal["mean", "sum"] = "mean"
    centres: Literal["student", "teacher"] = "student"
    prior_factor: bool | Literal["frequency"] = False
    context: Literal["nwgm", "full"] = "nwgm"
    warmup_epochs: int = -1

    def __post_init__(self) -> None:
        _check_weights(self, ("alpha", "beta", "aa"))
        _check_choice(self, "sample_loss", ("nm_mse", "mse"))
        _check_choice(self, "class_reduction", ("mean", "sum"))
        _check_intervention(self)


@METHODS.register("cid")
class CID(Method):
    """Comprehensive, interventional distillation (eq. 8, spec §1.2.5). Terms: ``kl``,
    ``sample``, ``class_shape``, ``intervention_ce`` (``ce`` instead without intervention)."""

    Options = CIDOptions

    @classmethod
    def requirements(cls, opts: CIDOptions) -> Requirements:
        teacher_centres = opts.use_intervention and opts.centres == "teacher"
        embedding = opts.use_sample or opts.use_class or teacher_centres
        return Requirements(teacher_fields=("logits", "embedding") if embedding else ("logits",))

    @classmethod
    def check_run(cls, opts: CIDOptions, epochs: int) -> None:
        if opts.use_intervention:
            check_warmup(opts.warmup_epochs, epochs)

    def __init__(self, opts: CIDOptions, ctx: MethodContext) -> None:
        super().__init__(opts, ctx)
        self.parts = nn.ModuleDict()
        if opts.use_sample:
            sample = SampleOptions(opts.alpha, opts.sample_loss, opts.sample_bias)
            self.parts["sample"] = CIDSample(sample, ctx)
        if opts.use_class:
            shape = ClassShapeOptions(opts.beta, opts.class_reduction)
            self.parts["class_shape"] = CIDClassShape(shape, ctx)
        if opts.use_intervention:
            self.parts["intervention"] = CIDIntervention(
                InterventionOptions(
                    weight=opts.aa,
                    T=opts.T,
                    warmup_epochs=opts.warmup_epochs,
                    centres=opts.centres,
                    prior_factor=opts.prior_factor,
                    context=opts.context,
                ),
                ctx,
            )
        mark_rank_local_buffers(self)

    def forward(  # type: ignore[override]
        self, student: ModelOutput, teacher: TeacherOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        z_t = _teacher_tensor(teacher, "logits", "cid")
        terms = {"kl": self.opts.aa * kd_loss(student.logits, z_t, self.opts.T)}
        for part in self.parts.values():
            terms.update(part(student, teacher, batch))
        if not self.opts.use_intervention:
            terms["ce"] = self.opts.aa * cross_entropy(student.logits, batch.labels)
        return terms

    def eval_logits(self, student: ModelOutput) -> Tensor:
        if "intervention" in self.parts:
            return self.parts["intervention"].eval_logits(student)
        return student.logits

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        for part in self.parts.values():
            part.start_epoch(epoch)

    def end_epoch(self, epoch: int) -> None:
        for part in self.parts.values():
            part.end_epoch(epoch)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts.values() for p in part.no_decay_parameters()]

    def epoch_metrics(self) -> dict[str, float]:
        return {k: v for part in self.parts.values() for k, v in part.epoch_metrics().items()}

    def sync_for_checkpoint(self) -> None:
        if "intervention" in self.parts:
            self.parts["intervention"].sync_for_checkpoint()
