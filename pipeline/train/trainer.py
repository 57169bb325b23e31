"""The Accelerate training loop: AMP, DDP, accumulation, evaluation, checkpoint and resume.

Re-running the same command resumes from ``<run_dir>/checkpoints/last.pt`` (model, method state,
optimiser, scaler, RNG states, position) and continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from pipeline.config.schema import RunSpec
from pipeline.data import AugPlan, build_eval_loader, build_train_loader, to_device
from pipeline.data.rotate import rotate_batch
from pipeline.distill.compose import mark_rank_local_buffers
from pipeline.evaluate.loop import SplitOutputs, collect_split
from pipeline.evaluate.metrics import evaluate_all
from pipeline.teacher.online import teacher_run_id
from pipeline.threads import share_cpu_threads
from pipeline.track.conventions import run_description
from pipeline.track.mlflow_tracker import Tracker
from pipeline.train.bad_samples import BadSampleReport
from pipeline.train.build import build_data, build_parts
from pipeline.train.checkpoint import (
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from pipeline.train.compile import compile_run
from pipeline.train.distiller import Distiller
from pipeline.train.empty_batch import report_empty_step, zero_loss
from pipeline.train.hot_loop import configure_backends, place_teacher, read_ahead
from pipeline.train.optim import build_optimizer
from pipeline.train.phases import EpochPhase, PhasePlan, phase_optimizer
from pipeline.train.progress import Progress
from pipeline.train.resume_guard import check_resume, record_config
from pipeline.train.run_end import (
    EpochMeans,
    dataset_inputs,
    finish_outputs,
    norms_teacher,
    write_history,
)
from pipeline.train.schedule import set_lr
from pipeline.train.signals import STOP
from pipeline.types import Batch


def run_dir_for(spec: RunSpec) -> Path:
    return Path(spec.run_dir or Path("runs") / spec.name).resolve()


def make_accelerator(spec: RunSpec, ddp: DistributedDataParallelKwargs) -> Accelerator:
    """``ddp`` is read by ``prepare``, so its fields may still be set after this returns."""
    cpu = spec.train.cpu or not torch.cuda.is_available()
    handlers = [
        ddp,
        InitProcessGroupKwargs(timeout=timedelta(seconds=spec.train.dist_timeout_s)),
    ]
    return Accelerator(
        cpu=cpu,
        mixed_precision=spec.train.mixed_precision,
        gradient_accumulation_steps=spec.optim.grad_accum,
        kwargs_handlers=handlers,
    )


class Trainer:
    def __init__(self, spec: RunSpec, *, load_teacher: bool = True, config_text: str = "") -> None:
        self.spec = spec
        self.run_dir = run_dir_for(spec)
        self.resume_plan = check_resume(spec, self.run_dir)  # before any data or weights
        set_seed(spec.seed)
        if spec.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        data = build_data(spec)
        ddp = DistributedDataParallelKwargs()
        acc = make_accelerator(spec, ddp)
        self.acc = acc
        configure_backends(spec, acc.device)
        if acc.device.type == "cpu":
            share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
        self.plan = AugPlan.from_spec(spec.data, spec.seed)
        # The epoch-0 loader fixes the number of steps every process runs per epoch.
        n_steps = len(build_train_loader(data.train_index, spec.data, self.plan, 0, spec.seed,
                                         acc.process_index, acc.num_processes, 0))
        self.steps_per_epoch = self._steps(n_steps)
        self.parts = build_parts(spec, self.steps_per_epoch, load_teacher, data)
        # Parameters without a gradient in some steps (CID's classifier during warm-up, the
        # student's classifier under CoSS, what an initial phase does not train) make DDP wait
        # for them unless it is told.
        method = self.parts.method
        self.phases = PhasePlan(type(method).phases(method.opts), spec.optim.epochs,
                                spec.optim.lr)
        ddp.find_unused_parameters = (
            any(True for _ in method.parameters()) or not method.needs.uses_student_logits
            or bool(self.phases.phases)
        )
        if spec.train.channels_last:
            self.parts.student.to(memory_format=torch.channels_last)
        distiller = Distiller(self.parts.student, self.parts.method)
        # DDP copies rank 0's buffers to every process each forward: exempt rank-local sums.
        mark_rank_local_buffers(distiller)
        optimizer = build_optimizer(self.parts.student, self.parts.method, spec.optim,
                                    fused=acc.device.type == "cuda")
        self.distiller, self.optimizer = acc.prepare(distiller, optimizer)
        self.phase_optimizers: dict[str, Any] = {}
        self.teacher = place_teacher(self.parts.teacher, spec, acc.device, acc.mixed_precision)
        self.compile_s = compile_run(spec, acc, self.parts.student, self.teacher, method,
                                     self.plan.size)
        self.tracker = Tracker(spec.tracking, enabled=acc.is_main_process)
        self.config_text = config_text
        self.stop = STOP
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.epoch_rows: list[dict[str, Any]] = []  # <run_dir>/epochs.json (run_end.py)
        self.epoch_means = EpochMeans()
        self.final_outputs: dict[str, SplitOutputs] = {}
        self.bad_report = BadSampleReport(self.run_dir)

    # -- data -------------------------------------------------------------------------------
    def _train_loader(self, epoch: int, start_step: int):
        return build_train_loader(
            self.parts.train_index,
            self.spec.data,
            self.plan,
            epoch,
            self.spec.seed,
            self.acc.process_index,
            self.acc.num_processes,
            start_step,
        )

    def _steps(self, n: int) -> int:
        cap = self.spec.train.max_steps_per_epoch
        return min(n, cap) if cap > 0 else n

    def _optimizer_for(self, at: EpochPhase) -> Any:
        """The main optimiser, or the (prepared) SGD of an initial phase, made when first met."""
        if at.phase is None:
            return self.optimizer
        if at.name not in self.phase_optimizers:
            model = self.acc.unwrap_model(self.distiller)
            opt = phase_optimizer(model.method, at.phase, model.student, self.spec.optim)
            self.phase_optimizers[at.name] = self.acc.prepare(opt)
        return self.phase_optimizers[at.name]

    def _prepare(self, batch: Batch) -> Batch:
        d = self.spec.data
        return to_device(batch, self.acc.device, d.mean, d.std, self.spec.train.channels_last)

    # -- state ------------------------------------------------------------------------------
    def _state(self, epoch: int, step: int, updates: int) -> dict:
        scaler = getattr(self.acc, "scaler", None)
        rngs = self.acc.gather_for_metrics([rng_state(self.acc.device)], use_gather_object=True)
        return {
            "model": self.acc.unwrap_model(self.distiller).state_dict(),
            # the optimiser of the phase this position belongs to (a phase's own SGD, or main)
            "optimizer": self._optimizer_for(self.phases.at(epoch)).state_dict(),
            "phase": self.phases.at(epoch).name,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "step": step,
            "updates": updates,
            "best": self.best,
            "history": self.history,
            "epoch_rows": self.epoch_rows,
            "mlflow_run_id": self.tracker.run_id,
            "world_size": self.acc.num_processes,
        }

    def save(self, epoch: int, step: int, updates: int) -> None:
        self.parts.method.sync_for_checkpoint()
        state = self._state(epoch, step, updates)
        state["bad_samples"] = self.bad_report.checkpoint_rows(  # collective; restored on resume
            self.spec.data.train_split, self.parts.train_index, self.acc, self.tracker,
            epoch * self.steps_per_epoch + step)
        if self.acc.is_main_process:
            atomic_save(state, checkpoint_path(self.run_dir))
        self.acc.wait_for_everyone()

    def _restore(self, ckpt: dict) -> None:
        self.phases.check_resume(ckpt["epoch"], ckpt.get("phase"))
        self.acc.unwrap_model(self.distiller).load_state_dict(ckpt["model"])
        self._optimizer_for(self.phases.at(ckpt["epoch"])).load_state_dict(ckpt["optimizer"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        if len(rngs) == self.acc.num_processes:
            set_rng_state(rngs[self.acc.process_index], self.acc.device)

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        spec, acc = self.spec, self.acc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = load_checkpoint(self.run_dir)
        epoch, step, updates = 0, 0, 0
        if ckpt is not None:
            self._restore(ckpt)
            epoch, step, updates = ckpt["epoch"], ckpt["step"], ckpt["updates"]
            self.best, self.history = ckpt["best"], ckpt["history"]
            self.epoch_rows = ckpt.get("epoch_rows", [])
            self.bad_report.restore(ckpt.get("bad_samples", []),
                                    [(spec.data.train_split, self.parts.train_index),
                                     *self.parts.eval_indices.items()])
            acc.print(f"resuming {self.run_dir} at epoch {epoch + 1}, step {step}")
        metrics_file = self.run_dir / "metrics.json"
        total_epochs = self.phases.total_epochs
        if epoch >= total_epochs and metrics_file.exists():
            acc.print(f"{self.run_dir} is already finished")
            return json.loads(metrics_file.read_text())
        self._start_tracking(ckpt)
        if self.compile_s is not None:
            self.tracker.log_metrics({"compile/seconds": self.compile_s}, 0)
        self.stop.install()
        try:
            while epoch < total_epochs:
                at = self.phases.at(epoch)
                updates = self._train_epoch(epoch, step, updates)
                if self.stop.requested:
                    return self._interrupt(epoch, updates)
                if at.is_main:
                    self.parts.method.end_epoch(at.local)
                self.bad_report.update(spec.data.train_split, self.parts.train_index, acc,
                                       self.tracker, (epoch + 1) * self.steps_per_epoch)
                train_means = self.epoch_means.pop()
                if at.is_main:  # nothing is evaluated during an initial phase
                    row = self._evaluate(at.local)
                    self.history.append(row)
                    self._update_best(row, at.local)
                    self.epoch_rows.append({**row, **train_means})
                    if acc.is_main_process:
                        write_history(self.run_dir, self.epoch_rows)
                epoch, step = epoch + 1, 0
                self.save(epoch, 0, updates)
            return self._finish(updates)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        finally:
            self.stop.uninstall()

    def _start_tracking(self, ckpt: dict | None) -> None:
        spec = self.spec
        tags = {
            "method": spec.method["name"],
            "student": spec.model.arch,
            "dataset": spec.data.dataset,
            "dataset_fingerprint": self.parts.train_index.fingerprint,
            "run_dir": str(self.run_dir),
        }
        if spec.teacher is not None and spec.teacher.arch:
            tags["teacher"] = spec.teacher.arch
            parent = teacher_run_id(spec.teacher.weights)
            if parent:
                tags["teacher_run_id"] = parent
        tags.update(self.parts.method.lineage_tags())  # a teacher-phase run's heads (SSKD ...)
        params = asdict(spec)
        params["world_size"] = self.acc.num_processes
        if self.phases.phases:
            params["phases"] = self.phases.describe()
        run_id = self.tracker.start(
            spec.tracking.run_name or spec.name,
            params,
            tags,
            resume_run_id=ckpt.get("mlflow_run_id") if ckpt else None,
            parent_run_id=spec.tracking.parent_run_id,
            description=run_description(spec, len(self.parts.train_index)),
        )
        if ckpt is None and self.tracker.enabled:
            self.tracker.log_inputs(dataset_inputs(spec, self.parts.train_index,
                                                   self.parts.eval_indices))
            self.tracker.log_model_inputs(tags.get("teacher_run_id"))
        if self.acc.is_main_process:
            position = (ckpt["epoch"], ckpt["step"]) if ckpt else (0, 0)
            record_config(self.run_dir, self.resume_plan, position, self.tracker)
            info = {"mlflow_run_id": run_id, "name": spec.name, **tags}
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))

    def _train_epoch(self, epoch: int, start_step: int, updates: int) -> int:
        spec, acc = self.spec, self.acc
        method = self.parts.method
        at = self.phases.at(epoch)
        method.set_phase(at.name)
        if at.is_main:
            method.start_epoch(at.local)
        self.acc.unwrap_model(self.distiller).run_student = (
            method.needs.uses_student if at.is_main else at.phase.uses_student)
        optimizer = self._optimizer_for(at)
        prefix = "" if at.is_main else f"{at.name}/"
        self.distiller.train()
        loader = read_ahead(self._train_loader(epoch, start_step), self.teacher)
        total = self.steps_per_epoch
        progress = Progress(acc.is_main_process and spec.train.progress, total, start_step,
                            at.local, at.name)
        sums: dict[str, torch.Tensor] = {}
        count, seen, t0 = 0, 0, time.perf_counter()
        step = start_step
        for raw in loader:
            if step >= total:
                break
            empty = len(raw) == 0  # every sample of it unreadable (counted by the loader)
            if empty and acc.num_processes == 1:
                step += 1
                continue
            if empty:  # the others run this step's collectives: take part (empty_batch.py)
                report_empty_step(acc.process_index, epoch, step)
            # rotated copies (SSKD, HSAKD) on the device, after every backend's crop and flip
            batch = rotate_batch(self._prepare(raw), self.plan.rotations)
            lr = (set_lr(optimizer, spec.optim, at.local + step / total) if at.is_main
                  else at.phase.lr)
            with acc.accumulate(self.distiller):
                teacher_out = None
                if self.teacher is not None:
                    with acc.autocast():  # the CPU batch: a cache looks rows up without a sync
                        teacher_out = self.teacher(raw, batch.images)
                with acc.autocast():
                    losses = self.distiller(batch.images, teacher_out, batch)
                    loss = zero_loss(losses) if empty else sum(losses.values())
                acc.backward(loss)
                if acc.sync_gradients and spec.optim.clip_grad_norm > 0:
                    acc.clip_grad_norm_(self.distiller.parameters(), spec.optim.clip_grad_norm)
                if acc.sync_gradients:
                    # The bare optimiser unless a grad scaler is in play: Accelerate's wrapper
                    # costs ~0.7 ms a step in checks (measured by tools/bench_distill.py).
                    (optimizer.optimizer if acc.scaler is None else optimizer).step()
                    optimizer.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                updates += 1
            step += 1
            # Detached tensors are summed on the device; reading them (a sync) waits for log steps.
            if not empty:
                for k, v in losses.items():
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach()
                sums["loss"] = sums["loss"] + loss.detach() if "loss" in sums else loss.detach()
                count += 1
            seen += len(batch) * acc.num_processes
            global_step = epoch * total + step
            if count and (step % spec.train.log_every_steps == 0 or step == total):
                rate = seen / (time.perf_counter() - t0)
                means = {k: float(v) / count for k, v in sums.items()}
                self.epoch_means.add(means, count)
                progress.update(means, rate)
                logged = {f"{prefix}train/{k}": v for k, v in means.items()}
                self.tracker.log_metrics(
                    {**logged, f"{prefix}lr": lr, "images_per_s": rate}, global_step)
                sums, count = {}, 0
            else:
                progress.update(None, 0.0)
            every = spec.train.checkpoint_every_steps
            if self.stop.check(step, spec.train.stop_check_every_steps, last=step == total):
                self._stop_position = (epoch, step)
                break
            if every > 0 and step % every == 0 and step < total:
                self.save(epoch, step, updates)
        progress.close()
        return updates

    def _interrupt(self, epoch: int, updates: int) -> dict[str, Any]:
        _, step = self._stop_position
        self.save(epoch, step, updates)
        self.tracker.set_tags({"interrupted": "true"})
        self.tracker.finish("KILLED")
        self.acc.print(f"stopped by signal at epoch {epoch + 1} step {step}; checkpoint saved")
        return {"interrupted": True, "epoch": epoch, "step": step}

    def _evaluate(self, epoch: int) -> dict[str, Any]:
        """Evaluate after main-phase epoch ``epoch`` (0-based, initial phases not counted)."""
        spec = self.spec
        row: dict[str, Any] = {"epoch": epoch + 1}
        step = (self.phases.initial_epochs + epoch + 1) * self.steps_per_epoch
        last = epoch + 1 == spec.optim.epochs
        if not last and (epoch + 1) % max(spec.train.eval_every, 1) != 0:
            return row
        self.distiller.eval()
        predictors = self._predictors(last)
        for split, index in self.parts.eval_indices.items():
            predict, extras = predictors[split == spec.data.eval_splits[0]]
            loader = build_eval_loader(
                index, spec.data, self.acc.process_index, self.acc.num_processes
            )
            with self.acc.autocast():
                out = collect_split(predict, loader, self._prepare, self.acc.device, extras)
            metrics = evaluate_all(out.logits, out.labels)
            if last:  # kept for the plots of the run's end
                self.final_outputs[split] = out
            for k, v in metrics.items():
                row[f"{split}/{k}"] = v
            self.bad_report.update(split, index, self.acc, self.tracker, step)
        extra = self.parts.method.epoch_metrics()
        row.update({f"method/{k}": v for k, v in extra.items()})
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step)
        if self.acc.is_main_process:
            first = spec.data.eval_splits[0]
            self.acc.print(
                f"epoch {epoch + 1}/{spec.optim.epochs}: "
                + " ".join(
                    f"{s}/top1={row.get(f'{s}/top1', float('nan')):.2f}"
                    for s in spec.data.eval_splits
                )
                + f" ({first} ece={row.get(f'{first}/ece', float('nan')):.3f})"
            )
        return row

    def _predictors(self, last: bool) -> dict[bool, tuple[Any, tuple[str, ...]]]:
        """The evaluation's predict functions for the other splits (False) and the first one
        (True). The last evaluation also returns feature norms: the student's on every split,
        the teacher's (an extra teacher pass) on the first split only."""
        distiller = self.acc.unwrap_model(self.distiller)
        if not last:
            return {False: (distiller.predict, ()), True: (distiller.predict, ())}
        teacher = norms_teacher(self.spec, self.teacher, distiller.method.needs.teacher_fields,
                                self.parts.num_classes, self.acc.device)
        student_only = (distiller.predict_with_norms, ("student",))
        if teacher is None:
            return {False: student_only, True: student_only}
        both = (lambda x: distiller.predict_with_norms(x, teacher)), ("student", "teacher")
        return {False: student_only, True: both}

    def _update_best(self, row: dict, epoch: int) -> None:
        key = f"{self.spec.data.eval_splits[0]}/top1"
        if key in row and row[key] > self.best.get(key, -1.0):
            self.best = {**row, "best_epoch": epoch + 1}

    def _end_outputs(self) -> dict[str, float]:
        """Plots, epoch history and the logged model (main process); their cost in seconds."""
        spec = self.spec
        history = write_history(self.run_dir, self.epoch_rows)
        self.tracker.log_artifact(history)
        model = None
        if spec.tracking.log_model:
            model = {"state": self.run_dir / "student.pt", "arch": spec.model.arch,
                     "num_classes": self.parts.num_classes, "image_size": spec.data.image_size}
        classes = list(self.parts.train_index.classes)
        return finish_outputs(self.run_dir, self.final_outputs, classes, self.epoch_rows,
                              self.tracker, model)

    def _finish(self, updates: int) -> dict[str, Any]:
        acc, best = self.acc, self.best
        last = next((r for r in reversed(self.history) if len(r) > 1), {})
        first = self.spec.data.eval_splits[0]
        student = acc.unwrap_model(self.distiller).student
        method = acc.unwrap_model(self.distiller).method
        # Checksums per process: equal values show the replicas stayed in sync. DDP keeps the
        # parameters equal by itself; the method's state (CID's centres) must agree by design.
        checksum = float(sum(p.detach().double().sum() for p in student.parameters()))
        method_sum = float(sum(t.detach().double().sum() for t in method.state_dict().values()
                               if t.is_floating_point()))
        checksums = acc.gather_for_metrics([checksum], use_gather_object=True)
        method_checksums = acc.gather_for_metrics([method_sum], use_gather_object=True)
        final = {
            "world_size": acc.num_processes,
            "param_checksums": checksums,
            "method_state_checksums": method_checksums,
            "last": last,
            "best": best,
            "best_top1": best.get(f"{first}/top1"),
            "last_top1": last.get(f"{first}/top1"),
            "updates": updates,
            "mlflow_run_id": self.tracker.run_id,
        }
        if acc.is_main_process:
            atomic_save(student.state_dict(), self.run_dir / "student.pt")
            method_state = acc.unwrap_model(self.distiller).method.state_dict()
            if method_state:
                atomic_save(method_state, self.run_dir / "method.pt")
            metrics_file = self.run_dir / "metrics.json"
            summary = {f"best/{k}": v for k, v in best.items() if isinstance(v, (int, float))}
            self.tracker.log_metrics(summary, self.phases.total_epochs * self.steps_per_epoch)
            final["end_costs"] = self._end_outputs()
            metrics_file.write_text(json.dumps(final, indent=2))
            self.tracker.log_artifact(metrics_file)
            self.tracker.finish("FINISHED")
        acc.wait_for_everyone()
        return final
