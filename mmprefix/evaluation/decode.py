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


@torch.no_grad()
def answer_questions(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                     prompt: str | None = None, **generate: Any) -> list[str]:
    """Generated answers, decoded without special tokens (``prompt``: instead of the family's question
    template)."""
    kind = family(model)
    tokenizer = _tokenizer(processor)
    settings = {"max_new_tokens": 8, "num_beams": 1, **generate}
    if kind == "blip":
        inputs = processor(images=list(images), text=list(questions), return_tensors="pt", padding=True)
        return _decode(tokenizer, model.generate(**_on_device(inputs, model), **settings))
    return _generate_after_prompt(model, processor, images, prompts(model, processor, "vqa", questions, prompt), settings)


@torch.no_grad()
def caption_images(model: Any, processor: Any, images: Sequence[Any], **generate: Any) -> list[str]:
    """Generated captions, decoded without special tokens."""
    kind = family(model)
    settings = {"max_new_tokens": 24, "num_beams": 1, **generate}
    if kind == "blip":
        inputs = dict(processor(images=list(images), return_tensors="pt"))
        # BLIP's own default decoder start, spelled out: a soft prompt goes into input_ids, so they must exist.
        text = model.config.text_config
        inputs["input_ids"] = torch.tensor([[text.bos_token_id, text.eos_token_id]]).repeat(len(images), 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return _decode(_tokenizer(processor), model.generate(**_on_device(inputs, model), **settings))
    texts = prompts(model, processor, "caption", [""] * len(images))
    return _generate_after_prompt(model, processor, images, texts, settings)


def _generate_after_prompt(model: Any, processor: Any, images, texts, settings) -> list[str]:
    """Generation after each row's image and prompt; the text generated after the prompt, decoded."""
    tokenizer = _tokenizer(processor)
    if family(model) == "blip2":  # the processor's image tokens and prompt without padding, re-padded on the left
        pixel_values, rows = _image_prompts(processor, images, texts)
        inputs = {"pixel_values": pixel_values, "input_ids": _pad(rows, tokenizer.pad_token_id, left=True),
                  "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}
    else:
        inputs = image_prompt_inputs(processor, images, texts)
    inputs = _on_device(inputs, model)
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    ids = inputs["input_ids"]
    if out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]  # decoder-only language models return the prompt too
    return _decode(tokenizer, out)


@torch.no_grad()
def complete_texts(model: Any, tokenizer: Any, prompts: Sequence[str], **generate: Any) -> list[str]:
    """A causal LM's continuations of ``prompts`` (left-padded batch), without the prompts."""
    settings = {"max_new_tokens": 16, "num_beams": 1, **generate}
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    ids = _pad(rows, tokenizer.pad_token_id, left=True)
    mask = _pad([[1] * len(r) for r in rows], 0, left=True)
    inputs = _on_device({"input_ids": ids, "attention_mask": mask}, model)
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    return _decode(tokenizer, out[:, ids.shape[1] :])
