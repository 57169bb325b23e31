"""Checks shared by methods' ``Options.__post_init__``.

Each raises ``ValueError("<option>: expected <what is allowed>, found <value>")``; the config
loader reports it as ``<file>: method.<option>: expected ..., found ...`` with the file (or
``--set``) that set the option. Every number must be finite: YAML reads ``.nan`` and ``.inf``.
"""

from __future__ import annotations

import math
from typing import Any


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_temperature(T: float, key: str = "T") -> None:
    if not (_finite(T) and T > 0):
        raise ValueError(f"{key}: expected a temperature > 0, found {T}")


def check_weights(opts: Any, *keys: str) -> None:
    """Loss weights: finite and >= 0."""
    for key in keys:
        value = getattr(opts, key)
        if not (_finite(value) and value >= 0):
            raise ValueError(f"{key}: expected a weight >= 0, found {value}")


def check_at_least(opts: Any, key: str, low: float, what: str = "a value") -> None:
    value = getattr(opts, key)
    if not (_finite(value) and value >= low):
        raise ValueError(f"{key}: expected {what} >= {low}, found {value}")


def check_interval(opts: Any, key: str, low: float, high: float, *, closed_high: bool) -> None:
    """``low <= value <= high`` (or ``< high``)."""
    value = getattr(opts, key)
    below = value <= high if closed_high else value < high
    if not (_finite(value) and low <= value and below):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{key}: expected a value in [{low}, {high}{bracket}, found {value}")


def check_choice(opts: Any, key: str, choices: tuple[str, ...]) -> None:
    if getattr(opts, key) not in choices:
        raise ValueError(f"{key}: expected one of {choices}, found {getattr(opts, key)!r}")
