"""Model outputs as text: answers, captions and continuations generated in batches, with the same formatting
as training (``data/formatting.py``), decoded without special tokens and without the prompt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..data.formatting import _image_prompts, _pad, _tokenizer, family, image_prompt_inputs, prompts

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
    return _decode(_tokenizer(processor), answer_tokens(model, processor, images, questions, prompt, **generate))


@torch.no_grad()
def answer_tokens(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                  prompt: str | None = None, **generate: Any) -> torch.Tensor:
    """The tokens `answer_questions` decodes: each row's generated tokens, without the prompt (or BLIP's
    decoder start); rows that ended early are padded."""
    settings = {"max_new_tokens": DEFAULT_NEW_TOKENS["vqa"], "num_beams": 1, **generate}
    if family(model) == "blip":
        inputs = processor(images=list(images), text=list(questions), return_tensors="pt", padding=True)
        return model.generate(**_on_device(inputs, model), **settings)[:, 1:]
    return _generate_after_prompt(model, processor, images, prompts(model, processor, "vqa", questions, prompt), settings)


@torch.no_grad()
def caption_images(model: Any, processor: Any, images: Sequence[Any], **generate: Any) -> list[str]:
    """Generated captions, decoded without special tokens."""
    return _decode(_tokenizer(processor), caption_tokens(model, processor, images, **generate))


@torch.no_grad()
def caption_tokens(model: Any, processor: Any, images: Sequence[Any], **generate: Any) -> torch.Tensor:
    """The tokens `caption_images` decodes (see `answer_tokens`)."""
    settings = {"max_new_tokens": DEFAULT_NEW_TOKENS["caption"], "num_beams": 1, **generate}
    if family(model) == "blip":
        inputs = dict(processor(images=list(images), return_tensors="pt"))
        # BLIP's own default decoder start, spelled out: a soft prompt goes into input_ids, so they must exist.
        text = model.config.text_config
        inputs["input_ids"] = torch.tensor([[text.bos_token_id, text.eos_token_id]]).repeat(len(images), 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return model.generate(**_on_device(inputs, model), **settings)[:, 1:]
    texts = prompts(model, processor, "caption", [""] * len(images))
    return _generate_after_prompt(model, processor, images, texts, settings)


def _generate_after_prompt(model: Any, processor: Any, images, texts, settings) -> torch.Tensor:
    """Generation after each row's image and prompt; the tokens generated after the prompt."""
    tokenizer = _tokenizer(processor)
    if family(model) == "blip2":  # the processor's image tokens and prompt without padding, re-padded on the left
        pixel_values, rows = _image_prompts(processor, images, texts)
        inputs = {"pixel_values": pixel_values, "input_ids": _pad(rows, tokenizer.pad_token_id, left=True),
                  "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}
    else:
        inputs = image_prompt_inputs(processor, images, texts)
    return generate_after(model, tokenizer, _on_device(inputs, model), settings)


def generate_after(model: Any, tokenizer: Any, inputs: dict[str, Any], settings: dict[str, Any]) -> torch.Tensor:
    """``model.generate(**inputs)`` with the tokenizer's padding and end of text; the tokens after the prompt
    (decoder-only language models return the prompt too)."""
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    ids = inputs["input_ids"]
    if out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]
    return out


@torch.no_grad()
def complete_texts(model: Any, tokenizer: Any, prompts: Sequence[str], **generate: Any) -> list[str]:
    """A causal LM's continuations of ``prompts`` (left-padded batch), without the prompts."""
    return _decode(tokenizer, continuation_tokens(model, tokenizer, prompts, **generate))


@torch.no_grad()
def continuation_tokens(model: Any, tokenizer: Any, prompts: Sequence[str], **generate: Any) -> torch.Tensor:
    """The tokens `complete_texts` decodes (see `answer_tokens`)."""
    settings = {"max_new_tokens": DEFAULT_NEW_TOKENS["text"], "num_beams": 1, **generate}
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    ids = _pad(rows, tokenizer.pad_token_id, left=True)
    mask = _pad([[1] * len(r) for r in rows], 0, left=True)
    inputs = _on_device({"input_ids": ids, "attention_mask": mask}, model)
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    return out[:, ids.shape[1] :]
