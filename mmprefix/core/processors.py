"""What the core asks of a model's processor beyond tokenizing: a chat turn with an image (``init="text"`` on a
chat VLM; the recipes' chat prompt format builds its prompts with the same turn)."""

from __future__ import annotations

from typing import Any


def chat_prompt(processor: Any, text: str) -> str:
    """One user turn, an image then ``text``, through the processor's chat template (which puts the family's
    image placeholders where the model expects them), with the assistant's turn opened."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
