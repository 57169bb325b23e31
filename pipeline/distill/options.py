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


def check_stage_selection(selection: Any, key: str = "stages") -> None:
    """A non-empty selection of stage maps: stage indices (negative count from the end) and
    ``"all"`` (every stage after the stem); see ``pipeline.models.features.resolve_stages``."""
    from pipeline.models.features import ALL_STAGES

    items = list(selection) if isinstance(selection, list | tuple) else [selection]
    bad = [s for s in items
           if not (s == ALL_STAGES or (isinstance(s, int) and not isinstance(s, bool)))]
    if not items or bad:
        raise ValueError(f"{key}: expected a list of stage indices or {ALL_STAGES!r}, found "
                         f"{selection!r}")
