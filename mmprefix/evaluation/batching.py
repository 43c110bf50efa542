"""What the prediction loops share: routing a model to one prefix for a whole run, and batching."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..data.formats import prompt_format
from ..core.model import PrefixModel
from ..core.routing import ACTIVE


def routed(model: Any, prefix: Any) -> contextlib.AbstractContextManager:
    """Route every call inside to ``prefix`` on a PrefixModel; ``ACTIVE`` changes nothing, ``None`` on a plain
    model is the model itself."""
    if prefix is ACTIVE or (prefix is None and not isinstance(model, PrefixModel)):
        return contextlib.nullcontext()
    if not isinstance(model, PrefixModel):
        raise ValueError(f"prefix={prefix!r} needs a PrefixModel; {type(model).__name__} carries no prefixes")
    return model.using(prefix)


def prefix_label(model: Any, prefix: Any) -> Any:
    if prefix is ACTIVE:
        return model.active_prefix if isinstance(model, PrefixModel) else None
    return prefix


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def same_length_batches(items: Sequence[Any], lengths: Sequence[int], size: int) -> list[list[Any]]:
    """Batches of at most ``size`` items that all have the same token length: no padding inside a batch."""
    groups: dict[int, list[Any]] = {}
    for item, length in zip(items, lengths):
        groups.setdefault(length, []).append(item)
    return [list(chunk) for group in groups.values() for chunk in chunks(group, size)]


def needs_same_length(task: str, model: Any) -> bool:
    """Whether a generation batch must hold questions of one token length (`PromptFormat.same_length_vqa`:
    transformers' ``BlipForQuestionAnswering.generate`` lets the answer decoder attend to the question's padding,
    its mask all ones, so a padded question's answer would depend on the rest of its batch)."""
    return task == "vqa" and prompt_format(model).same_length_vqa
