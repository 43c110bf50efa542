"""A generative job's model inputs, made once when it is accepted: the tensors of its prompt alone (unpadded,
so that a prefill computes exactly what the request computes alone), how many tokens it reads, and how many it
may generate within the model's context.

The formatting is the evaluation's (``data/formatting.py``): BLIP reads the question (VQA) or only the image
(captions) and its decoder starts from ``[DEC]``; chat-template VLMs get one user turn with the image and the
question (``"vqa"``, ``"caption"``) or a whole conversation (``"chat"``), through the processor's chat template;
causal language models continue the prompt (``"text"``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..data.formatting import family, prompts
from ..evaluation.decode import DEFAULT_NEW_TOKENS

PREPARED_FAMILIES = ("blip", "chat", "lm")


class ContextTooLong(ValueError):
    """The prompt and the tokens asked for do not fit the model's context."""


@dataclass
class Prepared:
    """``inputs``: the model inputs of this request alone, on the model's device. ``prompt_tokens``: the tokens
    the model reads as text (image placeholders included). ``limit``: the most tokens it generates. ``shape``:
    requests with equal shapes can be prefilled together without padding."""

    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    limit: int
    shape: Hashable


def prepare(model: Any, processor: Any, job: Any, default_limit: int, extra_positions: int = 0) -> Prepared:
    """The job's `Prepared` inputs, or `ContextTooLong`. ``default_limit``: the most new tokens when the job asks
    for no number (its task's default otherwise, the smaller); ``extra_positions``: positions its prefix takes
    (PEFT-style prefixes shift the prompt's)."""
    kind = family(model)
    if kind == "blip":
        if job.task == "vqa":
            inputs = dict(processor(images=[job.image], text=[job.text], return_tensors="pt"))
            read = inputs["input_ids"].shape[1]
        else:
            inputs, read = {"pixel_values": processor(images=[job.image], return_tensors="pt")["pixel_values"]}, 1
        text_config = model.config.text_config
        if read > text_config.max_position_embeddings:
            raise ContextTooLong(f"the question has {read} tokens; this model reads at most {text_config.max_position_embeddings}")
        used = 1  # the decoder starts from [DEC]
    else:
        inputs = _causal_inputs(model, processor, job)
        used = read = inputs["input_ids"].shape[1]
    context = model.config.get_text_config(decoder=True).max_position_embeddings
    limit = _limit(job, default_limit, context, used + extra_positions)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
    # rows with several images prefill alone: a batch's vision tower must see one image per row to route it
    shape = tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items())) if images <= 1 else object()
    return Prepared(inputs, read, limit, shape)


def _causal_inputs(model: Any, processor: Any, job: Any) -> dict[str, torch.Tensor]:
    if job.task == "text":  # as ``decode.complete_texts`` feeds a causal LM
        encoded = processor(job.text, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if job.task == "chat":
        text = processor.apply_chat_template(list(job.messages), add_generation_prompt=True, tokenize=False)
        images = list(job.images) or None
        if images is None:
            return dict(processor(text=[text], return_tensors="pt"))
        return dict(processor(images=images, text=[text], return_tensors="pt"))
    text = prompts(model, processor, job.task, [job.text or ""])[0]
    return dict(processor(images=[[job.image]], text=[text], return_tensors="pt"))


def _limit(job: Any, default: int, context: int, used: int) -> int:
    asked = job.setting("max_new_tokens")
    room = context - used
    if asked is None:
        if room < 1:
            raise ContextTooLong(f"the prompt takes {used} of this model's {context} positions: no room to generate")
        return min(DEFAULT_NEW_TOKENS.get(job.task, default), default, room)
    if asked > room:
        raise ContextTooLong(f"this model's context is {context} positions; the prompt takes {used} and "
                             f"{asked} new tokens were asked for: ask for at most {max(room, 0)}")
    return asked


def preparable(model: Any, task: str) -> bool:
    """Whether jobs of ``task`` on ``model`` are prepared here (generative tasks of BLIP, chat VLMs and causal
    LMs); other models keep the evaluation's batched formatting, request by request."""
    return task in ("vqa", "caption", "text", "chat") and family(model) in PREPARED_FAMILIES
