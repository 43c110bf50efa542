"""Text generation records in JSONL."""

from __future__ import annotations

from ..records import TextSample
from .common import PathLike, Record, UniqueIds, read_jsonl


def read_text_jsonl(path: PathLike) -> list[TextSample]:
    """Read JSONL lines ``{"prompt", "target"}``; ``id`` is optional (default: the 0-based record index)
    and so is ``target`` (``""``, for prompts to complete only)."""
    samples = []
    ids = UniqueIds(path, "id")
    for index, where, raw in read_jsonl(path):
        record = Record(raw, path, where)
        ids.add(record.get("id", "id", index), where)
        samples.append(TextSample(id=record.get("id", "id", index), prompt=record.get("prompt", "str"),
                                  target=record.get("target", "str", "")))
    return samples


