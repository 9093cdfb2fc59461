"""Typed YAML: a mapping checked against dataclasses, ``--set`` overrides, numeric ranges.

Generic machinery under :mod:`ctrltok.core.config` (which declares ctrltok's recipe sections): a key
no dataclass declares, a value of the wrong type, or a number out of its range is a
:class:`ConfigError` naming where it was found. Written by hand because the type checks must give
one-line errors in recipe terms (``file: section.key``), which neither dataclasses nor YAML do.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe value that cannot be used; the message names the file and the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly convert) one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, found {value!r}")
        return build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 5e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, found {value!r}")


def build(cls: type, mapping: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(mapping) - names, key=str)  # a YAML key may be a number or null
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; expected one of {sorted(names)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in mapping.items()}
    required = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:  # e.g. a tokens.custom entry without `token`: a one-line error, not a TypeError
        raise ConfigError(f"{where}: missing key {required[0]!r} (a {cls.__name__} needs {required})")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(mapping: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``dotted.key=value`` strings to a nested mapping (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: expected dotted.key=value, found {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = mapping
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key!r} goes through a non-mapping value")
        try:
            node[parts[-1]] = _parse_scalar(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {item!r}: the value is not YAML ({' '.join(str(exc).split())[:120]}); "
                              "quote it, e.g. --set 'key=\"text\"'") from exc
    return mapping


def range_problem(value: Any, rule: str) -> str | None:
    """What is wrong with ``value`` under ``rule`` (``">0"``, ``">=N"``, or an interval ``"[a,b]"`` / ``"[a,b)"`` / ``"(a,b)"``), or ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "expected a finite number"
    if rule.startswith(">="):
        low = float(rule[2:])
        return None if value >= low else f"expected {'an integer' if isinstance(value, int) else 'a number'} >= {rule[2:]}"
    if rule.startswith(">"):
        return None if value > float(rule[1:]) else f"expected a number > {rule[1:]}"
    low, high = (float(x) for x in rule[1:-1].split(","))
    ok = (value >= low if rule[0] == "[" else value > low) and (value <= high if rule[-1] == "]" else value < high)
    return None if ok else f"expected a value in {rule}"
