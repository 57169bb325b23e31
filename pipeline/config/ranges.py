"""The allowed range of every numeric config key, checked when a config loads.

One table per section: (key, rule). A rule is a pair (test, allowed) where ``allowed`` is what the
error says is allowed, so every message reads ``<file>: <key>: expected <allowed>, found <value>``
and names the file (or ``--set``) that set the key last. Floats must also be finite (``.nan``
and ``.inf`` are valid YAML, and ``nan > 0`` is False but ``nan < 0`` is False too).

The method section's numbers (temperatures, loss weights ...) are checked by each method's
``Options.__post_init__`` through ``pipeline.distill.options``; the loader reports those the same
way. Keys whose range depends on another key (warm-up below the epochs, CoSS's k <= m) are here
too, after the single-key rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipeline.config.coerce import fail
from pipeline.config.schema import RunSpec

Rule = tuple[Callable[[Any], bool], str]

SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy)
PAD_CROP_SIZES = {"cifar": 32, "tiny_imagenet": 64}  # fixed crops of pipeline/data/plan.py


def at_least(low: int | float) -> Rule:
    return (lambda v: v >= low), f"a value >= {low}"


def positive(what: str = "a value") -> Rule:
    return (lambda v: v > 0), f"{what} > 0"


def in_range(low: float, high: float, *, closed_high: bool, what: str = "a value") -> Rule:
    bracket = "]" if closed_high else ")"
    if closed_high:
        return (lambda v: low <= v <= high), f"{what} in [{low}, {high}{bracket}"
    return (lambda v: low <= v < high), f"{what} in [{low}, {high}{bracket}"


def _table(spec: RunSpec) -> list[tuple[str, Any, Rule]]:
    d, o, t = spec.data, spec.optim, spec.train
    rows: list[tuple[str, Any, Rule]] = [
        ("seed", spec.seed, in_range(0, SEED_MAX, closed_high=True, what="an integer")),
        ("data.image_size", d.image_size, at_least(1)),
        ("data.batch_size", d.batch_size, at_least(1)),
        ("data.eval_batch_size", d.eval_batch_size, at_least(1)),
        ("data.workers", d.workers, at_least(0)),
        ("data.ram_cache_mb", d.ram_cache_mb, at_least(0)),
        ("data.views", d.views, at_least(0)),
        ("data.eval_resize", d.eval_resize, (lambda v: v == 0 or v >= d.image_size,
                                             f"0 (no resize) or a size >= data.image_size "
                                             f"= {d.image_size}")),
        ("data.num_classes", d.num_classes, (lambda v: v == 0 or v >= 2,
                                             "0 (from the dataset) or a count >= 2")),
        ("data.synthetic_size", d.synthetic_size, at_least(1)),
        ("data.coss_k", d.coss_k, at_least(0)),
        ("data.coss_m", d.coss_m, at_least(1)),
        ("optim.lr", o.lr, positive("a learning rate")),
        ("optim.momentum", o.momentum, in_range(0, 1, closed_high=False, what="a momentum")),
        ("optim.weight_decay", o.weight_decay, at_least(0)),
        ("optim.epochs", o.epochs, at_least(1)),
        ("optim.gamma", o.gamma, (lambda v: 0 < v <= 1, "a decay factor in (0, 1]")),
        ("optim.warmup_epochs", o.warmup_epochs, (lambda v: 0 <= v < o.epochs,
                                                  f"a value in [0, optim.epochs = {o.epochs})")),
        ("optim.grad_accum", o.grad_accum, at_least(1)),
        ("optim.clip_grad_norm", o.clip_grad_norm, (lambda v: v >= 0,
                                                    "0 (no clipping) or a norm > 0")),
        ("train.eval_every", t.eval_every, at_least(1)),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps, at_least(0)),
        ("train.log_every_steps", t.log_every_steps, at_least(1)),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch, at_least(0)),
        ("train.dist_timeout_s", t.dist_timeout_s, at_least(1)),
        ("train.stop_check_every_steps", t.stop_check_every_steps, at_least(1)),
    ]
    rows += [(f"optim.milestones[{i}]", m, at_least(1)) for i, m in enumerate(o.milestones)]
    rows += [(f"data.std[{i}]", s, positive()) for i, s in enumerate(d.std)]
    rows += [(f"data.mean[{i}]", m, (lambda v: True, "a finite number"))
             for i, m in enumerate(d.mean)]
    if spec.teacher is not None:
        rows += [
            ("teacher.cache_topk", spec.teacher.cache_topk, at_least(0)),
            ("teacher.cache_chunk", spec.teacher.cache_chunk, at_least(1)),
            ("teacher.cache_prefetch", spec.teacher.cache_prefetch, at_least(0)),
        ]
    return rows


def _pair(key: str, values: list[float], low_ok: Callable[[float], bool], low_text: str,
          high: float | None, root: str) -> None:
    """A [low, high] list: two finite values, low <= high, each within its bounds."""
    if len(values) != 2:
        fail(key, f"expected 2 values [low, high], found {len(values)}", root)
    a, b = values
    bounds = f"{low_text}" + (f" and high <= {high}" if high is not None else "")
    if not (math.isfinite(a) and math.isfinite(b) and low_ok(a) and a <= b
            and (high is None or b <= high)):
        fail(key, f"expected [low, high] with {bounds} and low <= high, found {values}", root)


def check_ranges(spec: RunSpec, root: str) -> None:
    """ConfigError for the first key outside its range (see the module docstring)."""
    for key, value, (ok, allowed) in _table(spec):
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and ok(value)):
            fail(key, f"expected {allowed}, found {value}", root)
    d = spec.data
    crop = PAD_CROP_SIZES.get(d.augment)
    if crop is not None and d.image_size != crop:
        fail("data.image_size", f"expected {crop} with data.augment {d.augment!r} (its training "
             f"crop is {crop}×{crop}; evaluation uses image_size), found {d.image_size}", root)
    _pair("data.rrc_scale", d.rrc_scale, lambda v: v > 0, "0 < low", 1.0, root)
    _pair("data.rrc_ratio", d.rrc_ratio, lambda v: v > 0, "0 < low", None, root)
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != 3:
            fail(key, f"expected 3 values (one per RGB channel), found {len(values)}", root)
