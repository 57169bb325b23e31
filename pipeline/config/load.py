"""Load a YAML config into a validated ``RunSpec``: bases, overrides, provenance, checks.

One run's config is resolved in this order:

1. ``base:`` files (a string or a list), each path relative to the file that names it, loaded
   recursively and deep-merged in the order listed: mappings merge key by key, anything else
   (lists included) is replaced by the later value. One exception: a ``method`` section that
   names a different method replaces the inherited section instead of merging into it;
2. the file's own keys, merged on top the same way;
3. ``--set a.b=c`` overrides, in order. The value is read as YAML and then fitted to the schema
   type of its key: ``data.batch_size=32`` is an int, ``optim.lr=1e-3`` a float,
   ``optim.milestones=[30,60]`` a list, ``teacher.weights=null`` None, and ``name=42`` the
   string ``"42"`` because ``name`` is a str.

Every key remembers the file (or ``--set``) that set it last, so an error names that file.
The merged mapping is then validated against ``pipeline.config.schema.RunSpec`` (names, types),
the ``method`` section against its registered method's ``Options``, then cross-field rules and,
optionally, the existence of paths.

Paths inside a config (``data.root``, ``model.weights``, ``teacher.weights``) are relative to
the CURRENT WORKING DIRECTORY, not to the config file: the project's configs are run from the
repository root. They are kept in the ``RunSpec`` as written; only the existence check resolves
them. ``base:`` paths are the exception: they are relative to the file that names them.

YAML is read with ``yaml.safe_load`` only: a config is data, never code.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import check_archs, check_files, check_values
from pipeline.config.coerce import (
    accepts_text,
    check,
    fail,
    field_types,
    file_for,
    join,
    provenance,
    to_dataclass,
)
from pipeline.config.errors import ConfigError
from pipeline.config.schema import RunSpec
from pipeline.registry import Registry, closest

__all__ = ["load_config", "dump_config", "to_dataclass", "ConfigError"]

SET = "--set"  # what errors show as the "file" of a key set by an override
_MERGE_TAG = "tag:yaml.org,2002:merge"  # YAML's `<<: *anchor`, which may repeat
# libyaml's safe loader where PyYAML was built with it (about 10× faster than the pure one; the
# same documents, errors and marks), else the pure-Python one
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    methods: Registry[Any],
    models: Registry[Any] | None = None,
    check_paths: bool = True,
) -> RunSpec:
    """Read, merge, override and validate the config at ``path`` into a ``RunSpec``.

    ``overrides`` are ``"dotted.key=value"`` strings (the ``--set`` flags of the launchers).
    ``methods`` is the registry the ``method`` section is validated against and ``models`` the
    one ``model.arch`` and ``teacher.arch`` are checked against (None: not checked); the config
    stage imports neither (callers pass them: ``pipeline.catalog.load_run_config`` does).
    With ``check_paths`` the data root and weight files must exist (see the module docstring
    for how relative paths resolve). Any problem raises ``ConfigError`` naming the file, the
    dotted key, and what was expected and found.

    Besides its fields, the returned spec carries ``spec.method_options``: the method's parsed
    ``Options`` object. ``spec.method`` is the plain, YAML-dumpable form of the same section,
    ``{"name": ..., **options}`` with every option present (defaults filled in).
    """
    origins: dict[str, str] = {}
    root = Path(path).expanduser().resolve()
    if not root.is_file():
        what = "is not a file" if root.exists() else "not found"
        raise ConfigError(f"config file {what}: {root}")
    raw = _load_file(root, origins, ())
    _apply_overrides(raw, origins, overrides, methods)
    shown = _show(root)
    with provenance(origins):
        spec = to_dataclass(RunSpec, raw, "", shown)
        method_cls = _resolve_method(spec, shown, methods)
        if models is not None:
            check_archs(spec, models, shown)
        check_values(spec, method_cls, shown)
        if check_paths:
            check_files(spec, shown)
    return spec


def dump_config(spec: RunSpec) -> str:
    """The resolved config as YAML; ``load_config`` reads it back to an equal ``RunSpec``."""
    return yaml.safe_dump(_plain(spec), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------- reading files


def _show(path: Path) -> str:
    """A file as errors show it: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    shown = _show(path)
    try:
        text = path.read_text(encoding="utf-8")
        loader = _SAFE_LOADER(text)  # parsed once: the node graph is checked, then constructed
        try:
            node = loader.get_single_node()
            _check_duplicates(node, shown)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{shown}: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: cannot read the file: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "list"}.get(type(data), type(data).__name__)
        raise ConfigError(f"{shown}: expected a mapping of config keys at the top, found {kind}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line 3, column 7: invalid YAML: <problem> (<context>)`` from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        context += f" started at line {context_mark.line + 1}"
    return f"{where}invalid YAML: {problem}" + (f" ({context})" if context else "")


def _check_duplicates(node: yaml.Node | None, shown: str) -> None:
    """Refuse a mapping that repeats a key (``safe_load`` would silently keep the last)."""
    seen_nodes: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    ident = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    if ident in first:
                        raise ConfigError(
                            f"{shown}: line {line}: duplicate key {key_node.value!r} "
                            f"(first set at line {first[ident]})"
                        )
                    first[ident] = line
                stack.append(value_node)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _load_file(path: Path, origins: dict[str, str], chain: tuple[Path, ...]) -> dict[str, Any]:
    """The file's bases merged, then its own keys; fills ``origins`` (dotted key → file)."""
    shown = _show(path)
    if path in chain:
        cycle = " -> ".join(_show(p) for p in (*chain, path))
        raise ConfigError(f"{shown}: base files form a cycle: {cycle}")
    own = _read_yaml(path)
    bases = own.pop("base", None)
    merged: dict[str, Any] = {}
    for base in _base_list(bases, shown):
        base_path = (path.parent / Path(base).expanduser()).resolve()
        if not base_path.is_file():
            what = "is not a file" if base_path.exists() else "not found"
            raise ConfigError(f"{shown}: base file {what}: {base_path} (base: {base!r})")
        base_origins: dict[str, str] = {}
        layer = _load_file(base_path, base_origins, (*chain, path))
        _merge(merged, origins, layer, base_origins, "")
    _merge(merged, origins, own, _record(own, shown, ""), "")
    return merged


def _base_list(bases: Any, shown: str) -> list[str]:
    if bases is None:
        return []
    if isinstance(bases, str):
        return [bases]
    if isinstance(bases, list) and all(isinstance(b, str) for b in bases):
        return bases
    raise ConfigError(f"{shown}: base: expected a path or a list of paths, found {bases!r}")


def _record(data: Any, file: str, prefix: str) -> dict[str, str]:
    """Origins for every key under ``data``, all set by ``file``."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            path = join(prefix, key)
            out[path] = file
            out.update(_record(value, file, path))
    return out


def _merge(
    dst: dict[str, Any],
    dst_origins: dict[str, str],
    src: dict[str, Any],
    src_origins: dict[str, str],
    prefix: str,
) -> None:
    """Deep-merge ``src`` into ``dst`` (mappings key by key, anything else replaced)."""
    for key, value in src.items():
        path = join(prefix, key)
        if (
            isinstance(value, dict)
            and isinstance(dst.get(key), dict)
            and not _switches(path, value, dst[key])
        ):
            dst_origins[path] = src_origins.get(path, dst_origins.get(path, ""))
            _merge(dst[key], dst_origins, value, src_origins, path)
            continue
        dst[key] = copy.deepcopy(value)
        for old in [k for k in dst_origins if k.startswith(path + ".")]:
            del dst_origins[old]
        for new, file in src_origins.items():
            if new == path or new.startswith(path + "."):
                dst_origins[new] = file


def _switches(path: str, new: dict[str, Any], old: dict[str, Any]) -> bool:
    """A ``method`` section naming another method replaces the inherited one: the options of
    one method mean nothing to another."""
    return path == "method" and "name" in new and new["name"] != old.get("name")


# ---------------------------------------------------------------------------- overrides


def _apply_overrides(
    raw: dict[str, Any], origins: dict[str, str], overrides: Iterable[str],
    methods: Registry[Any],
) -> None:
    """Merge each ``key=value`` into ``raw``, then fit the values to the schema types."""
    parsed: list[tuple[list[str], str, Any]] = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or not all(parts):
            raise ConfigError(f"{SET}: expected dotted.key=value, found {text!r}")
        if parts[0] == "base":
            raise ConfigError(f"{SET}: {key}: base files cannot be set by an override")
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            message = f"{SET}: {key}: cannot read {value_text!r} as YAML: {problem}"
            raise ConfigError(message) from None
        layer: Any = value
        for part in reversed(parts):
            layer = {part: layer}
        _merge(raw, origins, layer, _record(layer, SET, ""), "")
        parsed.append((parts, value_text.strip(), value))
    for parts, value_text, value in parsed:
        tp = _type_at(parts, raw, methods)
        if tp is None or not accepts_text(tp) or isinstance(value, str | list | dict):
            continue
        if value is None and value_text != "":
            continue  # an explicit null stays None
        parent = raw
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(parts[-1]) is value:
            parent[parts[-1]] = value_text  # name=42 → "42"; mixed_precision=no → "no"


def _type_at(parts: list[str], raw: dict[str, Any], methods: Registry[Any]) -> Any:
    """The schema type hint of a dotted key, or None when the key is not in the schema."""
    tp: Any = RunSpec
    for i, part in enumerate(parts):
        args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            tp = args[0]  # X | None → X
        if tp is RunSpec and part == "method":
            if parts[i + 1 : i + 2] == ["name"]:
                return str
            tp = _method_options_type(raw, methods)
            if tp is None:
                return None
        elif dataclasses.is_dataclass(tp):
            tp = field_types(tp).get(part)
            if tp is None:
                return None
        elif getattr(tp, "__origin__", None) is dict:
            tp = tp.__args__[1]
        else:
            return None
    return tp


def _method_options_type(raw: dict[str, Any], methods: Registry[Any]) -> Any:
    section = raw.get("method")
    name = section.get("name") if isinstance(section, dict) else None
    if not isinstance(name, str) or name not in methods:
        return None
    options = getattr(methods.get(name), "Options", None)
    return options if dataclasses.is_dataclass(options) else None


# ---------------------------------------------------------------------------- method section


def _resolve_method(spec: RunSpec, root: str, methods: Registry[Any]) -> Any:
    """Validate ``spec.method`` by its method's ``Options``; set ``spec.method_options``."""
    section = dict(spec.method)
    known = ", ".join(methods.names()) or "none registered"
    if "name" not in section:
        fail("method", f"missing key 'method.name' (known methods: {known})", root)
    name = check(str, section.pop("name"), "method.name", root)
    if name not in methods:
        hint = closest(name, methods.names())
        tail = f"; did you mean {hint!r}?" if hint else ""
        fail("method.name", f"unknown method {name!r}{tail} (known methods: {known})", root)
    method_cls = methods.get(name)
    options = method_cls.parse_options(section, "method", file_for("method", root))
    plain = _plain(options) if dataclasses.is_dataclass(options) else section
    spec.method = {"name": name, **plain}
    spec.method_options = options  # type: ignore[attr-defined]
    return method_cls


def _plain(value: Any) -> Any:
    """Dataclasses (their init fields) → dicts, tuples → lists, recursively: YAML-dumpable."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
