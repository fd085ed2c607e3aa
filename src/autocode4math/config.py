"""Dataclass configs from YAML presets, dotted `--set` overrides and typed options, checked by type.

`load_config(TrainConfig, "my-preset.yaml", ["mstep.lr=1e-4", "estep.k=8"], {"out": "run #2"})` reads
the preset, applies each override (its value parsed as YAML, so `true`, `3`, `1e-4` and `[a, b]` mean
what they say), then the values of typed CLI options as they are (never turned back into text), and
builds the nested dataclasses. Every value is validated against its field's type hint by pydantic
(a `TypeAdapter` over the plain dataclass), so a field someone adds to a config is checked without a
line here; the dataclasses' own `__post_init__` checks run after. Anything wrong raises `ConfigError`
with a one-line message naming where the value came from (the preset's path and line, the `--set`
item or the option), the field, the value and the expected type.

Conventions on top of the type hints:
- an unknown key is an error listing the known ones: a typo in an override must not train the wrong model;
- a bool is not a number (`estep.k=true` is an error, not 1);
- a str field given a number keeps the text as written (`--set name=007` is "007");
- a list field given a string takes it comma-separated (`--set modes=auto,cot`);
- a nested section given in part keeps its other defaults (EStepConfig's rollouts sample at
  temperature 1.0 even when only `estep.rollout.max_new_tokens` is overridden).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
Key = tuple[str, ...]
"""A field's path in a nested config: ("mstep", "lr") for `mstep.lr`."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A preset, override or option does not fit the config: the message names the source, field and value."""


def parse_value(text: str, where: str = "") -> Any:
    """Parse one override value as YAML (with `1e-4` read as a float); `where` prefixes a syntax error."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where or repr(text)}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _split_override(item: str) -> tuple[Key, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: not of the form key=value")
    key, text = item.split("=", 1)
    parts = tuple(p.strip() for p in key.split("."))
    if not all(parts):
        raise ConfigError(f"--set {item}: empty field name")
    return parts, text


def _put(tree: dict[str, Any], key: Key, value: Any, where: str) -> None:
    node = tree
    for part in key[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(key)} conflicts with a value given for {part}")
    node[key[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a": {"b": 1}, "c": "x"}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, text = _split_override(item)
        _put(tree, key, parse_value(text, f"--set {item}"), f"--set {item}")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_lines(node: yaml.Node, prefix: Key = ()) -> dict[Key, int]:
    """{field path: 1-based line} of every key in a composed YAML mapping."""
    lines: dict[Key, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key))
    return lines


def read_preset(path: str | Path) -> tuple[dict[str, Any], dict[Key, str]]:
    """(values, {field path: "path:line"}) of a YAML preset; a syntax error names its path, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark, opened = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f"; {e.context} at line {opened.line + 1}" if opened and getattr(e, "context", None) else ""
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}{context})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of field: value, got {type(data).__name__}")
    return data, {key: f"{path}:{line}" for key, line in _key_lines(node).items()}


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] | None = None,
    values: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> T:
    """A checked `cls` from, in increasing priority: `base` values, a preset file, `--set` overrides, typed values.

    `values` maps dotted field names to Python values (typed CLI options) and is not parsed again;
    errors name a value's key as `labels[key]`, by default as the option `--name` of its last part.
    """
    data: dict[str, Any] = copy.deepcopy(base or {})
    origins: dict[Key, str] = {}
    texts: dict[Key, str] = {}
    if path is not None:
        preset, origins = read_preset(path)
        data = _merge(data, preset)
    for item in overrides or []:
        key, text = _split_override(item)
        where = f"--set {item}"
        _put(data, key, parse_value(text, where), where)
        origins[key], texts[key] = where, text.strip()
    for name, value in (values or {}).items():
        key = tuple(name.split("."))
        where = (labels or {}).get(name) or "--" + key[-1].replace("_", "-")
        _put(data, key, value, where)
        origins[key] = where
    return from_dict(cls, data, origins, texts)


def from_dict(
    cls: type[T], data: dict[str, Any], origins: dict[Key, str] | None = None, texts: dict[Key, str] | None = None
) -> T:
    """Validate a nested dict against dataclass `cls`'s type hints and construct it (see the module docstring)."""
    from pydantic import ValidationError

    origins = origins or {}
    prepared = _prepare(cls, data, None, (), origins, texts or {})
    try:
        return _adapter(cls).validate_python(prepared)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], cls, origins)) from None
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


@functools.cache
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass in a hint (`Foo` or `Foo | None`), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a) and isinstance(a, type)), None)
    return None


def _members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union hint, or the hint itself."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default value (its default_factory's result, where it has one), or None."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _values(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)} if instance is not None else {}


def _prepare(cls: type, data: Any, default: Any, where: Key, origins: dict[Key, str], texts: dict[Key, str]) -> Any:
    """Apply the module's conventions to `data` for dataclass `cls` whose default instance is `default`.

    Raises ConfigError on unknown keys and on bools given to numbers; types themselves are pydantic's job.
    """
    if not isinstance(data, dict):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"did you mean {'.'.join((*where, close[0]))}?" if close else f"known: {', '.join(fields)}"
            raise ConfigError(f"{_origin(origins, (*where, name))}unknown field {'.'.join((*where, name))}; {hint}")
    out = {}
    for name, value in data.items():
        key, hint = (*where, name), hints[name]
        members, sub = _members(hint), _dataclass_type(hint)
        numeric = any(t in members for t in (int, float))
        if sub is not None and isinstance(value, dict):
            inner = getattr(default, name) if default is not None else _default_of(fields[name])
            value = _prepare(sub, {**_values(inner), **value}, inner, key, origins, texts)
        elif isinstance(value, bool) and bool not in members and numeric:
            raise ConfigError(
                f"{_origin(origins, key)}{'.'.join(key)} = {value!r}: expected {_type_name(hint)}, got a boolean"
            )
        elif str in members and not numeric and isinstance(value, int | float):
            value = texts.get(key, str(value))
        elif isinstance(value, str) and any(typing.get_origin(t) is list for t in members):
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[name] = value
    return out


def _origin(origins: dict[Key, str], key: Key) -> str:
    """The prefix "SOURCE: " of the value at `key` (its own or its nearest given parent's), or "" for a default."""
    for n in range(len(key), 0, -1):
        if key[:n] in origins:
            return f"{origins[key[:n]]}: "
    below = [o for k, o in origins.items() if key and k[: len(key)] == key]
    return f"{below[0]}: " if below else ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _field_at(cls: type, loc: tuple) -> tuple[Key, Any]:
    """(field path, type hint) of the deepest config field on pydantic's error location `loc`."""
    path: Key = ()
    hint: Any = cls
    for part in loc:
        sub = _dataclass_type(hint)
        if sub is None or not isinstance(part, str) or part not in typing.get_type_hints(sub):
            break
        path, hint = (*path, part), typing.get_type_hints(sub)[part]
    return path, hint


def _describe(error: dict[str, Any], cls: type, origins: dict[Key, str]) -> str:
    """One line for a pydantic error: source, field, value, expected type and pydantic's reason."""
    key, hint = _field_at(cls, tuple(error["loc"]))
    name = ".".join(key) or cls.__name__
    reason = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] in ("value_error", "assertion_error"):
        under = {k: o for k, o in origins.items() if k[: len(key)] == key}
        named = {o for k, o in under.items() if re.search(rf"\b{re.escape(k[-1])}\b", reason)}
        given = sorted(named or (set(under.values()) if key else set()))
        return f"{name}: {reason}" + (f" (given: {'; '.join(given)})" if given else "")
    reason = reason[:1].lower() + reason[1:]
    return f"{_origin(origins, key)}{name} = {error.get('input')!r}: expected {_type_name(hint)} ({reason})"


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a (nested) dataclass, for writing the resolved config into a run directory."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
