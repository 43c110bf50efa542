"""The layering engine: defaults, a YAML file, flags, then ``key=value`` overrides, each checked against the
settings dataclasses as it comes, merged in order."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, get_origin


from ...core import typed
from .yamlfile import SettingsError, parse_yaml


class _Patch(dict):
    """Keys set one by one inside a mapping setting (``eval.generation.num_beams=5``): merged into the mapping
    of the layers below instead of replacing it, as ``eval.generation={num_beams: 5}`` does."""


def _is_mapping(hint: Any) -> bool:
    return hint is dict or get_origin(hint) is dict


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    members = typed.union_members(hint) or (hint,)
    found = [m for m in members if dataclasses.is_dataclass(m)]
    return found[0] if found else None


def check_layer(cls: type, data: Any, source: str, path: str = "") -> dict[str, Any]:
    """One layer of settings (possibly partial) checked against ``cls``: every key must be a field and every
    value must fit its type; sections are checked recursively. Returns the layer with values converted."""
    if not isinstance(data, Mapping):
        raise SettingsError(f"{typed.location(source, path)} must be a mapping of settings, got {data!r}")
    fields = typed.hints(cls)
    checked = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise SettingsError(str(typed.unknown_key(str(key), list(fields), source, dotted)))
        section = _dataclass_in(fields[key])
        try:
            if section is not None and value is not None:
                checked[key] = check_layer(section, value, source, dotted)
            else:
                checked[key] = typed.check(value, fields[key], source, dotted)
                if isinstance(value, _Patch):
                    checked[key] = _Patch(checked[key])
        except typed.FieldError as err:
            raise SettingsError(str(err)) from None
    return checked


def _merge(base: dict[str, Any], layer: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``layer`` over ``base``: sections merge key by key, any other value replaces the one before."""
    fields = typed.hints(cls)
    merged = dict(base)
    for key, value in layer.items():
        section = _dataclass_in(fields[key])
        if section is not None and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value, section)
        elif isinstance(value, _Patch) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _field_at(cls: type, dotted: str, source: str) -> Any:
    """The type of the field a dotted key sets (inside a mapping field: ``Any``)."""
    hint: Any = cls
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        section = _dataclass_in(hint)
        if section is None:
            if _is_mapping(hint):
                return Any  # a key inside a free mapping, e.g. eval.generation.max_new_tokens
            raise SettingsError(f"{source}: {'.'.join(parts[:index])} is a value, not a section: cannot set {dotted}")
        fields = typed.hints(section)
        if part not in fields:
            raise SettingsError(str(typed.unknown_key(part, list(fields), source, ".".join(parts[: index + 1]))))
        hint = fields[part]
    return hint


def _parse_value(text: str, hint: Any, source: str) -> Any:
    """An override's value for a field of type ``hint``: text as written for text fields, else YAML."""
    members = typed.union_members(hint) or (hint,)
    takes_collection = any(get_origin(m) in (list, dict) for m in members)
    if str in members and text not in ("null", "~") and not (takes_collection and text.lstrip()[:1] in ("[", "{")):
        return text
    value = parse_yaml(text, source)
    if hint is Any and isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text  # "a: b" is a prompt, not a mapping
    return value


def override_layer(cls: type, overrides: Sequence[str], source: str = "command line") -> dict[str, Any]:
    """``key=value`` overrides as one layer (a nested mapping), each value parsed for its field."""
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"{source}: {item!r} is not key=value (e.g. train.learning_rate=3e-3)")
        key = key.strip().replace("-", "_")
        value = _parse_value(text, _field_at(cls, key, source), f"{source}: {key}={text}")
        node = layer
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            inside_mapping = _is_mapping(_field_at(cls, ".".join(parents[: depth + 1]), source))
            node = node.setdefault(part, _Patch() if inside_mapping else {})
        node[last] = value
    return layer


def layered(cls: type, layers: Sequence[tuple[str, Mapping[str, Any]]]) -> Any:
    """A ``cls`` from layers ``(source, mapping)``, later ones winning; each layer is checked on its own (errors
    name its source), then the merged settings run ``cls``'s own checks."""
    merged: dict[str, Any] = {}
    for source, layer in layers:
        merged = _merge(merged, check_layer(cls, layer, source), cls)
    try:
        return typed.build(cls, merged, "settings")
    except typed.FieldError as err:
        raise SettingsError(str(err)) from None


def set_in(layer: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key in a nested mapping (a layer under construction)."""
    *parents, last = dotted.split(".")
    for part in parents:
        layer = layer.setdefault(part, {})
    layer[last] = value


def unset_variables(text: str) -> list[str]:
    """The ``$NAME`` / ``${NAME}`` in ``text`` that the environment does not set."""
    names = re.findall(r"\$(?:\{(\w+)\}|(\w+))", text)
    return [a or b for a, b in names if (a or b) not in os.environ]


def check_path_variables(value: Any, path: str, source: str) -> None:
    """Every environment variable a path (or a mapping of paths) names must be set; else one line naming it."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_path_variables(item, f"{path}.{key}", source)
    elif isinstance(value, str):
        missing = unset_variables(value)
        if missing:
            raise SettingsError(f"{typed.location(source, path)} uses ${missing[0]}, which is not set: "
                                f"export {missing[0]}=/path/to/the/data (the config's comments say what it holds)")


