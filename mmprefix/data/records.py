"""One record type per task. Readers of every format produce these; recipes and the evaluation harness
consume them. Images are referenced, not loaded: ``image`` is a path (resolved when read) or, for samples
built in memory, a PIL image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VQASample:
    """A question about an image with its reference answers (VQAv2 has ten per question)."""

    question_id: Any
    image: Any  # path (str) or PIL.Image.Image
    question: str
    answers: list[str] = field(default_factory=list)
    image_id: Any = None
    answer_type: str | None = None
    question_type: str | None = None


@dataclass
class CaptionSample:
    """An image with its reference captions (none for images to caption only)."""

    image_id: Any
    image: Any  # path (str) or PIL.Image.Image
    captions: list[str] = field(default_factory=list)


@dataclass
class TextSample:
    """A prompt and the target text a model should produce for it."""

    id: Any
    prompt: str
    target: str = ""
