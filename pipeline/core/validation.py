"""The validation machinery behind pipeline.core.config.

A raw params tree is checked field by field into frozen dataclasses. An unknown, missing, repeated,
mistyped or out-of-range value gives one line naming its dotted key. A field's metadata may carry
`choices`, a numeric range (`min`, `max`) or `false_means` (what a YAML `false` stands for)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad params file: the message names the key."""


class FieldError(ConfigError):
    """A bad value found where only the key's tail is known (a cross-field check, a check against
    the model); whoever knows the rest of the path puts it in front with `under`."""

    def __init__(self, relative_key: str, problem: str):
        self.relative_key, self.problem = relative_key, problem
        super().__init__(f"params: '{relative_key}' {problem}")

    def under(self, prefix: str) -> "FieldError":
        return FieldError(f"{prefix}.{self.relative_key}" if prefix else self.relative_key, self.problem)


def bounded(lo: float | None = None, hi: float | None = None, **extra: Any) -> dict:
    return {"min": lo, "max": hi, **extra}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict, complete: bool = False) -> Any:
    if dataclasses.is_dataclass(tp):
        if value is False and "false_means" in meta:  # e.g. `online: false`: the section switched off
            return meta["false_means"]()
        return build_dataclass(tp, value, key, complete)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
        origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"params: '{key}' must be a non-empty mapping, got {value!r}")
        _, item_tp = typing.get_args(tp)
        return {str(k): _check_value(f"{key}.{k}", v, item_tp, {}, complete) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"params: '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_check_value(f"{key}[{i}]", v, item_tp, {}) for i, v in enumerate(value))
    if tp is str and value is False and "false_means" in meta:
        value = meta["false_means"]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"params: '{key}' must be a finite number, got {value!r}")
    if tp is not Any and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"params: '{key}' must be {_type_name(tp)}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"params: '{key}' must be one of {list(choices)}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"params: '{key}' must be in [{lo}, {hi}], got {value!r}")
    return value


def build_dataclass(cls: type, raw: Any, prefix: str, complete: bool = False) -> Any:
    where = prefix or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(f"'{prefix + '.' if prefix else ''}{k}'" for k in unknown)
        raise ConfigError(f"params: unknown key {names} (known in {where}: {', '.join(fields)})")
    missing = [name for name in fields if name not in raw] if complete else []
    if missing:
        names = ", ".join(f"'{prefix + '.' if prefix else ''}{k}'" for k in missing)
        raise ConfigError(f"params: missing key {names}: a params file sets every key (params.yaml as shipped "
                          "has them all, with comments)")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _check_value(key, value, hints[name], dict(fields[name].metadata), complete)
    try:
        return cls(**values)
    except FieldError as err:
        raise err.under(prefix) from None


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, mapping by mapping (a raw params tree and its changes)."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's later-wins for a repeated key would silently drop the first value: refuse it."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"params: key '{key}' appears twice in one mapping (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_params_yaml(path: Path) -> Any:
    """The raw tree of a params file; a missing file, invalid YAML or a repeated key is a ConfigError."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"params: no such file {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"params: {path} is not valid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, and what it expected."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split()) or type(err).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
