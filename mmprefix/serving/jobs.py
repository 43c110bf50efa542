"""What a request is (`Job`) and what a generative one returns (`Completion`), shared by both batching modes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class Job:
    """One request: a task, the prefix its row is routed to (None: the base model) and its inputs.

    ``generation``: sorted ``(setting, value)`` pairs (see `Engine.settings`). ``messages`` and ``images``: a
    conversation for the ``"chat"`` task, in the processor's chat-template form (``{"type": "image"}`` parts
    stand for ``images``, in order). ``on_text``: called in the serving thread with each new piece of the answer
    as it is generated. ``cancelled``: set it when the client has gone; a row being decoded then leaves its
    batch at the next step."""

    task: str
    prefix: str | None = None
    image: Any = None
    text: str | None = None
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    generation: tuple[tuple[str, Any], ...] = ()
    on_text: Callable[[str], None] | None = field(default=None, repr=False)
    messages: tuple[dict, ...] = ()
    images: tuple[Any, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    prepared: Any = field(default=None, repr=False, compare=False)  # set by `Engine.group` (`inputs.Prepared`)

    def setting(self, name: str, default: Any = None) -> Any:
        return dict(self.generation).get(name, default)


class Completion(str):
    """A generated answer (a ``str``) with how it ended and what it cost: ``finish_reason`` (``"stop"``: end of
    text or a stop sequence; ``"length"``: the token limit), ``prompt_tokens`` (the text the model read, image
    placeholder tokens included) and ``completion_tokens`` (the tokens it generated, the one that ended it
    included)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def __new__(cls, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> Completion:
        out = super().__new__(cls, text)
        out.finish_reason, out.prompt_tokens, out.completion_tokens = finish_reason, prompt_tokens, completion_tokens
        return out

    def __reduce__(self) -> tuple:  # pickled (Ray) with its fields
        return Completion, (str(self), self.finish_reason, self.prompt_tokens, self.completion_tokens)


class ClientGone(Exception):
    """The request was cancelled (its client went away) while it was being decoded."""


def notify(callback: Callable[[str], None], piece: str, row: int) -> bool:
    """Hand a piece of text to a listener; False (logged) if it raised: one listener must not fail the batch."""
    try:
        callback(piece)
        return True
    except Exception:  # noqa: BLE001
        logger.exception("the streaming listener of row %d failed; it gets no more text", row)
        return False
