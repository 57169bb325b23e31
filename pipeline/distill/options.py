"""Checks shared by methods' ``Options.__post_init__``; the config loader reports a ValueError
raised there as "<file>: method: <message>"."""

from __future__ import annotations

from typing import Any


def check_temperature(T: float, key: str = "T") -> None:
    if not T > 0:
        raise ValueError(f"{key}: expected a temperature > 0, found {T}")


def check_weights(opts: Any, *keys: str) -> None:
    for key in keys:
        if getattr(opts, key) < 0:
            raise ValueError(f"{key}: expected a weight >= 0, found {getattr(opts, key)}")
