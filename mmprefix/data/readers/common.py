"""What every reader shares: the error it raises, reading JSON and JSONL, checked fields, image paths."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, Union


from ..records import CaptionSample, VQASample


logger = logging.getLogger("mmprefix.data.readers")

PathLike = Union[str, "os.PathLike[str]"]


class AnnotationError(ValueError):
    """A malformed annotation record: ``path`` (file or dataset), ``where`` (line, index or key), ``reason``."""

    def __init__(self, path: Any, where: str, reason: str):
        self.path = str(path)
        self.where = where
        self.reason = reason
        super().__init__(f"{self.path}: {where}: {reason}")


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; a syntax error becomes an :class:`AnnotationError` with its line and column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8-sig") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            raise AnnotationError(path, where, f"invalid JSON: {error.msg}") from None
        except UnicodeDecodeError as error:
            raise AnnotationError(path, f"byte {error.start}", "not UTF-8 text") from None


def read_jsonl(path: PathLike) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(index, "line N", record)`` for each non-blank line; N is 1-based, index counts records."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    index = 0
    with open(path, "rb") as file:
        for number, data in enumerate(file, start=1):
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise AnnotationError(path, f"line {number}", "not UTF-8 text") from None
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(path, where, f"invalid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(record, dict):
                raise AnnotationError(path, where, f"expected a JSON object, got {type(record).__name__}")
            yield index, where, record
            index += 1


def is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda value: isinstance(value, str), "a string"),
    "id": (is_id, "an integer or a string"),
    "list": (lambda value: isinstance(value, list), "a list"),
    "dict": (lambda value: isinstance(value, dict), "an object"),
    "str_list": (is_str_list, "a list of strings"),
}


class Record:
    """One annotation record with the file and place it came from, for typed field access."""

    def __init__(self, record: Any, path: Any, where: str):
        self.path, self.where = path, where
        if not isinstance(record, dict):
            self.fail(f"expected an object, got {type(record).__name__}")
        self.record = record

    def fail(self, reason: str) -> NoReturn:
        raise AnnotationError(self.path, self.where, reason)

    def has(self, key: str) -> bool:
        return self.record.get(key) is not None

    def first(self, keys: Sequence[str], kind: str, default: Any) -> Any:
        """The first of ``keys`` that is present (checked against ``kind``), else ``default``."""
        for key in keys:
            if self.has(key):
                return self.get(key, kind)
        return default

    def get(self, key: str, kind: str, default: Any = ...) -> Any:
        """``record[key]`` checked against ``kind``; missing/null is an error unless a default is given."""
        value = self.record.get(key)
        if value is None:
            if default is not ...:
                return default
            self.fail(f"{key!r} is null" if key in self.record else f"missing key {key!r}")
        check, description = _CHECKS[kind]
        if not check(value):
            self.fail(f"{key!r} must be {description}, got {type(value).__name__} {short(value)}")
        return value


class UniqueIds:
    """The ids of one file, each with where it was first seen: a repeated id is an error naming both places (a
    second question with the same id would silently get the first one's answers, and predictions, keyed by id,
    would overwrite each other)."""

    def __init__(self, path: Any, what: str):
        self.path, self.what, self.seen = path, what, {}

    def add(self, value: Any, where: str) -> Any:
        """``value``, once it is known to be new."""
        if value in self.seen:
            raise AnnotationError(self.path, where, f"{self.what} {value!r} repeats the one at {self.seen[value]}; "
                                                    f"each record needs its own {self.what}")
        self.seen[value] = where
        return value


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def top(data: Any, path: PathLike, key: str, what: str, *, required: bool = True) -> list | None:
    """``data[key]`` as a list, or an :class:`AnnotationError` explaining the expected layout."""
    if not isinstance(data, dict) or (required and key not in data):
        raise AnnotationError(path, "top level", f"expected an object with a {key!r} list ({what})")
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise AnnotationError(path, f"[{key!r}]", f"expected a list, got {type(value).__name__}")
    return value


def image_root_of(annotation_path: PathLike | None, image_root: PathLike | None) -> str:
    """The folder that relative image names are joined to; an explicit one must exist."""
    if image_root is None:
        if annotation_path is None:
            return os.getcwd()
        return os.path.dirname(os.path.abspath(os.fspath(annotation_path)))
    root = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (image_root={os.fspath(image_root)!r})")
    return root


def join(root: str, *names: str) -> str:
    """Absolute, normalised path of ``names`` under ``root`` (an absolute name stays as it is)."""
    return os.path.normpath(os.path.join(root, *(os.path.expanduser(name) for name in names)))


def warn_if_first_image_missing(samples: Sequence[VQASample | CaptionSample], source: Any) -> None:
    """One cheap existence check: a wrong image_root/pattern shows up now, not hours into a run."""
    if samples and isinstance(samples[0].image, str) and not os.path.exists(samples[0].image):
        logger.warning("%s: the first sample's image %s does not exist; check image_root / image_pattern",
                       source, samples[0].image)


