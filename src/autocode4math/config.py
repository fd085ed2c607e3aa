"""Dataclass configs from YAML presets plus dotted command-line overrides.

`load_config(TrainConfig, "presets/toy.yaml", ["mstep.lr=1e-4", "estep.k=8"])` reads the preset,
applies each override (values parsed as YAML, so `true`, `3`, `1e-4` and `[a, b]` mean what they
say), and builds the nested dataclasses, whose `__post_init__` checks run as usual. Unknown keys are
errors, not silently ignored: a typo in an override must not train the wrong model.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A config file or override does not match the config's fields."""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a": {"b": 1}, "c": "x"}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[leaf] = parse_value(value)
    return tree


def parse_value(text: str) -> Any:
    """Parse one override value as YAML (with `1e-4` read as a float)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _dataclass_type(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}{name}.")
        elif hints[name] is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `--set name=7` parses as YAML int; a str field means the text "7"
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Preset file (optional) + overrides -> a checked dataclass instance."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a (nested) dataclass, for writing the resolved config into a run directory."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def with_overrides(config: T, overrides: dict[str, Any]) -> T:
    """A copy of dataclass `config` with a nested dict of field values merged in (checked like a preset)."""
    return from_dict(type(config), _merge(to_dict(config), overrides))
