"""Is ``timm:<name>`` a model timm can build? Checked when a config loads and again when the
network is built (``pipeline.models.base.build_model``), with the nearest timm names.

timm is imported only when a config names a ``timm:`` arch (it imports torch: ~10 s cold on a
small machine), so the config stage still loads without torch for every other config.
"""

from __future__ import annotations

import difflib
import functools

TIMM_PREFIX = "timm:"


@functools.cache
def _timm_names() -> tuple[str, ...] | None:
    try:
        import timm
    except ImportError:
        return None
    return tuple(timm.list_models())


def timm_problem(arch: str) -> str | None:
    """None when ``arch`` (``timm:<name>``, ``<name>`` may carry a ``.tag``) is a timm model,
    else what is wrong with it, with the nearest timm names."""
    name = arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch
    names = _timm_names()
    if names is None:
        return f"{arch!r} needs timm, which is not installed (pip install timm)"
    import timm

    if name and timm.is_model(name):
        return None
    near = difflib.get_close_matches(name.split(".")[0], names, n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(repr(TIMM_PREFIX + n) for n in near)}?" if near
            else "; timm.list_models() lists the names")
    return f"unknown timm model {name!r}{hint}"
