"""Model outputs as text: answers, captions and continuations generated in batches, with the same formatting
as training (``data/formatting.py``), decoded without special tokens and without the prompt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..data.formats import generate_after, pad_rows, prompt_format, tokenizer_of

__all__ = ["DEFAULT_NEW_TOKENS", "answer_questions", "answer_tokens", "caption_images", "caption_tokens",
           "complete_texts", "continuation_tokens", "generate_after"]


def _on_device(inputs: Any, model: Any) -> dict[str, Any]:
    """Generation inputs moved to where the model's weights are."""
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}


def _decode(tokenizer: Any, rows: torch.Tensor) -> list[str]:
    """Token ids to text, with single spaces and no space before punctuation (word-level vocabularies
    decode "shapes :" where the text said "shapes:")."""
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [re.sub(r"\s+([:;,.?!])", r"\1", " ".join(t.split())) for t in texts]


DEFAULT_NEW_TOKENS = {"vqa": 8, "caption": 24, "text": 16}


@torch.no_grad()
def answer_questions(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                     prompt: str | None = None, **generate: Any) -> list[str]:
    """Generated answers, decoded without special tokens (``prompt``: instead of the family's question
    template)."""
    return _decode(tokenizer_of(processor), answer_tokens(model, processor, images, questions, prompt, **generate))


@torch.no_grad()
def answer_tokens(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                  prompt: str | None = None, **generate: Any) -> torch.Tensor:
    """The tokens `answer_questions` decodes: each row's generated tokens, without the prompt (or BLIP's
    decoder start); rows that ended early are padded."""
    return _generated(model, processor, "vqa", images, questions, prompt, generate)


@torch.no_grad()
def caption_images(model: Any, processor: Any, images: Sequence[Any], **generate: Any) -> list[str]:
    """Generated captions, decoded without special tokens."""
    return _decode(tokenizer_of(processor), caption_tokens(model, processor, images, **generate))


@torch.no_grad()
def caption_tokens(model: Any, processor: Any, images: Sequence[Any], **generate: Any) -> torch.Tensor:
    """The tokens `caption_images` decodes (see `answer_tokens`)."""
    return _generated(model, processor, "caption", images, [""] * len(images), None, generate)


def _generated(model: Any, processor: Any, task: str, images: Sequence[Any], questions: Sequence[str],
               template: str | None, generate: dict[str, Any]) -> torch.Tensor:
    """Generation from the family's inputs for ``task``; the tokens generated after its prompt."""
    settings = {"max_new_tokens": DEFAULT_NEW_TOKENS[task], "num_beams": 1, **generate}
    form = prompt_format(model)
    inputs = form.generation_inputs(model, processor, task, images, questions, template)
    return form.generate(model, processor, task, _on_device(inputs, model), settings)


@torch.no_grad()
def complete_texts(model: Any, tokenizer: Any, prompts: Sequence[str], **generate: Any) -> list[str]:
    """A causal LM's continuations of ``prompts`` (left-padded batch), without the prompts."""
    return _decode(tokenizer, continuation_tokens(model, tokenizer, prompts, **generate))


@torch.no_grad()
def continuation_tokens(model: Any, tokenizer: Any, prompts: Sequence[str], **generate: Any) -> torch.Tensor:
    """The tokens `complete_texts` decodes (see `answer_tokens`)."""
    settings = {"max_new_tokens": DEFAULT_NEW_TOKENS["text"], "num_beams": 1, **generate}
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    ids = pad_rows(rows, tokenizer.pad_token_id, left=True)
    mask = pad_rows([[1] * len(r) for r in rows], 0, left=True)
    inputs = _on_device({"input_ids": ids, "attention_mask": mask}, model)
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    return out[:, ids.shape[1] :]
