"""A generative job's model inputs, made once when it is accepted: the tensors of its prompt alone (unpadded,
so that a prefill computes exactly what the request computes alone), how many tokens it reads, and how many it
may generate within the model's context.

The formatting is the evaluation's (``data/formatting.py``): BLIP reads the question (VQA) or only the image
(captions) and its decoder starts from ``[DEC]``; chat-template VLMs get one user turn with the image and the
question (``"vqa"``, ``"caption"``) or a whole conversation (``"chat"``), through the processor's chat template;
causal language models continue the prompt (``"text"``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.formats import pad_rows, prompt_format
from ..evaluation.decode import DEFAULT_NEW_TOKENS


class ContextTooLong(ValueError):
    """The prompt and the tokens asked for do not fit the model's context."""


@dataclass
class Prepared:
    """``inputs``: the model inputs of this request alone, on the model's device. ``prompt_tokens``: the tokens
    the model reads as text (image placeholders included). ``limit``: the most tokens it generates. ``group``:
    requests of equal groups can be prefilled together (their texts padded and masked)."""

    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    limit: int
    group: Hashable


def prepare(model: Any, processor: Any, job: Any, default_limit: int, extra_positions: int = 0) -> Prepared:
    """The job's `Prepared` inputs, or `ContextTooLong`. ``default_limit``: the most new tokens when the job asks
    for no number (its task's default otherwise, the smaller); ``extra_positions``: positions its prefix takes
    (PEFT-style prefixes shift the prompt's)."""
    if not prompt_format(model).continues_prompt:
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
    pixels = inputs.get("pixel_values")
    images = 0 if pixels is None else pixels.shape[0]
    # A batch's vision tower must see one image per row (or none at all) to route each row to its prefix: rows
    # with several images are prefilled alone.
    group = (tuple(sorted(inputs)), None if pixels is None else tuple(pixels.shape[1:])) if images <= 1 else object()
    return Prepared(inputs, read, limit, group)


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
    text = prompt_format(model).prompt_texts(processor, job.task, [job.text or ""])[0]
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


def padded_batch(inputs: Sequence[dict[str, torch.Tensor]], pad: int, left: bool) -> dict[str, torch.Tensor]:
    """One batch of single-request inputs: token ids and their mask padded (on the ``left``, or on the right as
    BLIP's processor pads), the rest (pixels) stacked."""
    out = {}
    for key in inputs[0]:
        if key in ("input_ids", "attention_mask"):
            rows = [row[key][0].tolist() for row in inputs]
            out[key] = pad_rows(rows, pad if key == "input_ids" else 0, left=left).to(inputs[0][key].device)
        else:
            out[key] = torch.cat([row[key] for row in inputs])
    return out


def preparable(model: Any, task: str) -> bool:
    """Whether jobs of ``task`` on ``model`` are prepared here (generative tasks of the formats serving decodes
    step by step: BLIP, chat VLMs and causal LMs); other models keep the evaluation's batched formatting, request
    by request."""
    return task in ("vqa", "caption", "text", "chat") and prompt_format(model).stepping is not None
