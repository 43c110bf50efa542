"""Typed values from untyped sources (JSON files, YAML configs, ``key=value`` overrides): each value is checked
against the type annotation of the dataclass field it is meant for, and every problem is a one-line
``FieldError`` that names the source, the field (as a dotted path) and what was expected.

Supported annotations: ``int``, ``float`` (an integer is accepted), ``str``, ``bool``, ``Any``, ``list[X]``,
``dict[str, X]``, ``X | None`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

__all__ = ["FieldError", "build", "check", "describe", "hints", "location", "union_members", "unknown_key"]


class FieldError(ValueError):
    """A value that does not fit its field; the message names where it came from and what was expected."""


def location(source: str, path: str) -> str:
    """``"source: path"``, or whichever of the two is given; a path that holds control characters (a key read
    from a file) is shown escaped, so that the error stays one line."""
    if path and not path.isprintable():
        path = repr(path)[1:-1]
    return ": ".join(part for part in (source, path) if part)


def hints(cls: type) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` and their (evaluated) type annotations."""
    resolved = get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def union_members(hint: Any) -> tuple[Any, ...] | None:
    """The members of a union annotation (``X | None``, ``Union[X, Y]``), else None."""
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return None


def describe(hint: Any) -> str:
    """What a value of this annotation looks like, in words."""
    members = union_members(hint)
    if members is not None:
        words = [describe(m) for m in members if m is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in members else "")
    origin = get_origin(hint)
    if origin is list:
        return f"a list of {_plural(get_args(hint)[0])}" if get_args(hint) else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", Any: "anything"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "texts", bool: "booleans"}.get(hint, describe(hint))


def _shown(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "text", list: "list", dict: "mapping"}
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {text}"


def check(value: Any, hint: Any, source: str = "", path: str = "") -> Any:
    """``value`` as ``hint`` wants it (an integer becomes a float for a float field; nested dataclasses are
    built), or a `FieldError` naming ``source`` and ``path``."""
    members = union_members(hint)
    if members is not None:
        if value is None and type(None) in members:
            return None
        others = [m for m in members if m is not type(None)]
        if len(others) == 1:  # X | None: X's own error says more than "X or null"
            return check(value, others[0], source, path)
        for member in others:
            try:
                return check(value, member, source, path)
            except FieldError:
                continue
        raise FieldError(f"{location(source, path)} must be {describe(hint)}, got {_shown(value)}")
    origin = get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(f"{location(source, path)} must be {describe(hint)}, got {_shown(value)}")
        (item,) = get_args(hint) or (Any,)
        return [check(v, item, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise FieldError(f"{location(source, path)} must be a mapping with text keys, got {_shown(value)}")
        item = get_args(hint)[1] if get_args(hint) else Any
        return {k: check(v, item, source, f"{path}.{k}" if path else k) for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise FieldError(f"{location(source, path)} must be a finite number, got {value}")
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported annotation {hint!r} at {path}")
    if not ok:
        raise FieldError(f"{location(source, path)} must be {describe(hint)}, got {_shown(value)}")
    return value


def unknown_key(key: str, valid: list[str], source: str, path: str) -> FieldError:
    """The error for a key that is not a setting: the closest valid key, then all of them."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = path.rpartition(".")[0]
    section = f"{where} takes" if where else "valid keys are"
    return FieldError(f"{location(source, path)} is not a setting{hint}; {section}: {', '.join(sorted(valid))}")


def build(cls: type, data: Any, source: str = "", path: str = "") -> Any:
    """A ``cls`` dataclass from a mapping: unknown keys are named with the valid ones, each value is checked
    against its field, nested dataclasses are built; errors of ``cls``'s own checks name the source."""
    if not isinstance(data, Mapping):
        raise FieldError(f"{location(source, path) or 'the settings'} must be {describe(cls)}, got {_shown(data)}")
    fields = hints(cls)
    values = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise unknown_key(str(key), list(fields), source, key_path)
        values[key] = check(value, fields[key], source, key_path)
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        missing = ", ".join(f"{path}.{name}" if path else name for name in required)
        raise FieldError(f"{location(source, path) or cls.__name__} lacks required setting(s) {missing}")
    try:
        return cls(**values)
    except FieldError:
        raise
    except (ValueError, TypeError) as err:
        raise FieldError(f"{location(source, path) or cls.__name__}: {err}") from None
