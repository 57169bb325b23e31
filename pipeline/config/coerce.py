"""Type-directed validation of raw YAML data into dataclasses (the generic half of the loader).

``to_dataclass`` walks a dataclass's fields by their type hints and checks every value against
its hint: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[T]``,
``tuple[...]``, ``dict[str, T]``, ``Any`` and nested dataclasses. Errors name the file, the
dotted key (``data.batch_size``, ``optim.milestones[2]``) and what was expected and found.

Strictness: ``bool`` is not an ``int`` or a ``float``; numbers are not strings. Two leniencies:
an ``int`` is accepted (and stored) as a ``float``, and a float field accepts a numeric string,
because PyYAML (YAML 1.1) reads ``1e-3`` and ``1.0e3`` as strings.

While ``load_config`` runs, ``provenance`` maps each dotted key to the file that set it last, so
an error names that file (a base file, say, or ``--set``) rather than the file passed in.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from pipeline.config.errors import ConfigError
from pipeline.registry import closest

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_ORIGINS: ContextVar[Mapping[str, str] | None] = ContextVar("config_origins", default=None)
_INDEX = re.compile(r"\[\d+\]")


@contextmanager
def provenance(origins: Mapping[str, str]) -> Iterator[None]:
    """Within the block, errors name the file that ``origins`` records for each dotted key."""
    token = _ORIGINS.set(origins)
    try:
        yield
    finally:
        _ORIGINS.reset(token)


def file_for(key: str, default: str) -> str:
    """The file that set ``key`` (or its closest recorded parent), else ``default``."""
    origins = _ORIGINS.get()
    if not origins or not key:
        return default
    parts = _INDEX.sub("", key).split(".")
    for n in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:n]))
        if found is not None:
            return found
    return default


def join(where: str, key: object) -> str:
    """The dotted key of ``key`` inside the section ``where`` (``""`` is the top level)."""
    return f"{where}.{key}" if where else str(key)


def describe(value: Any) -> str:
    """``str ('abc')``, ``mapping ({...})``, ``null``: how an error shows a found value."""
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} ({text})"


def type_name(tp: Any) -> str:
    """A reader's name for a type hint: ``int``, ``list[float]``, ``one of 'a', 'b'``."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if arg is Ellipsis else type_name(arg) for arg in get_args(tp))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def fail(key: str, message: str, file: str) -> NoReturn:
    """Raise ``ConfigError("<file>: <key>: <message>")`` with the file that set ``key``."""
    where = f"{key}: " if key else ""
    raise ConfigError(f"{file_for(key, file)}: {where}{message}")


def _wrong(tp: Any, value: Any, key: str, file: str) -> NoReturn:
    hint = ""
    if isinstance(value, bool) and accepts_text(tp):
        hint = "; YAML reads yes/no/on/off/true/false as booleans: quote the value"
    fail(key, f"expected {type_name(tp)}, found {describe(value)}{hint}", file)


def accepts_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return any(isinstance(arg, str) for arg in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(accepts_text(arg) for arg in get_args(tp))
    return False


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of each ``__init__`` field of dataclass ``cls``, in order."""
    try:
        hints = get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise TypeError(f"cannot resolve the type hints of {cls.__qualname__}: {exc}") from exc
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def unknown_key(key: object, valid: list[str], where: str, file: str) -> NoReturn:
    """Raise the unknown-key error, with the nearest valid key or else the list of them."""
    full = join(where, key)
    hint = closest(str(key), valid)
    if hint is not None:
        tail = f"; did you mean {join(where, hint)!r}?"
    else:
        section = f" in {where!r}" if where else ""
        tail = f" (valid keys{section}: {', '.join(valid)})"
    raise ConfigError(f"{file_for(full, file)}: unknown key {full!r}{tail}")


def to_dataclass(cls: type, raw: Any, where: str, file: str) -> Any:
    """Validate the mapping ``raw`` into an instance of dataclass ``cls``.

    ``where`` is the dotted key of the section (``""`` for the top level, ``"method"`` ...),
    ``file`` the config file to name in errors. Missing keys take the field defaults; unknown
    keys, wrong types and missing required keys raise ``ConfigError``.
    """
    if not isinstance(raw, dict):
        _wrong(cls, raw, where, file)
    hints = field_types(cls)
    for key in raw:
        if key not in hints:
            unknown_key(key, list(hints), where, file)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    kwargs: dict[str, Any] = {}
    for name, tp in hints.items():
        if name in raw:
            kwargs[name] = check(tp, raw[name], join(where, name), file)
        elif name in required:
            fail(where, f"missing required key {join(where, name)!r}", file)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ check of the dataclass
        if isinstance(exc, ConfigError):
            raise
        # "<field>: <problem>" names the key: report it as <where>.<field>, with the file that
        # set that key (a --set of method.T, say, rather than the file of the section).
        name, sep, problem = str(exc).partition(": ")
        if sep and name in hints:
            fail(join(where, name), problem, file)
        fail(where, str(exc), file)


def check(tp: Any, value: Any, key: str, file: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it converted (int → float, list →
    tuple, mapping → dataclass) or raise ``ConfigError`` naming ``key``."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        return _check_union(tp, value, key, file)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in get_args(tp)):
            return value
        _wrong(tp, value, key, file)
    if origin in (list, tuple) or tp in (list, tuple):
        return _check_sequence(tp, value, key, file)
    if origin is dict or tp is dict:
        return _check_mapping(tp, value, key, file)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return to_dataclass(tp, value, key, file)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        return value  # a typing construct this loader does not know: accept as is
    if not ok:
        _wrong(tp, value, key, file)
    return value


def _check_union(tp: Any, value: Any, key: str, file: str) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        _wrong(tp, value, key, file)
    arms = [arg for arg in args if arg is not type(None)]
    if len(arms) == 1:
        return check(arms[0], value, key, file)
    for arm in arms:
        try:
            return check(arm, value, key, file)
        except ConfigError:
            continue
    _wrong(tp, value, key, file)


def _check_sequence(tp: Any, value: Any, key: str, file: str) -> Any:
    if not isinstance(value, list | tuple):
        _wrong(tp, value, key, file)
    args = get_args(tp)
    is_tuple = tp is tuple or get_origin(tp) is tuple
    if not args:
        items = list(value)
    elif is_tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            fail(key, f"expected {len(args)} values ({type_name(tp)}), found {len(value)}", file)
        items = [
            check(a, v, f"{key}[{i}]", file)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        ]
    else:
        items = [check(args[0], v, f"{key}[{i}]", file) for i, v in enumerate(value)]
    return tuple(items) if is_tuple else items


def _check_mapping(tp: Any, value: Any, key: str, file: str) -> Any:
    if not isinstance(value, dict):
        _wrong(tp, value, key, file)
    args = get_args(tp)
    key_tp, value_tp = args if len(args) == 2 else (Any, Any)
    out: dict[Any, Any] = {}
    for k, v in value.items():
        if key_tp is str and not isinstance(k, str):
            fail(key, f"keys must be str, found {describe(k)}", file)
        out[k] = check(value_tp, v, join(key, k), file)
    return out
