"""Turning samples into model inputs, per task and model family: what the recipes train on and what the
evaluation decodes from (``evaluation/decode.py``), so that both see exactly the same formatting. Each family's
way is its prompt format's (``data/formats.py``); CLIP-like models (transformers CLIP or open_clip) name each
class by prompts from templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.architectures import is_open_clip
from .formats import (IGNORE, blip_decoder_text, chat_prompt, image_prompt_inputs, per_row, prompt_and_target,
                      prompt_format)

__all__ = ["IGNORE", "blip_decoder_text", "caption_batch", "chat_prompt", "class_prompts", "classification_batch",
           "family", "image_prompt_inputs", "per_row", "prompt_and_target", "prompts", "vqa_batch"]


def family(model: Any) -> str:
    """The name of the model's prompt format: ``"blip"``, ``"blip2"`` (BLIP-2 and InstructBLIP), ``"chat"``,
    ``"paligemma"`` or ``"lm"`` (plain language models, and models without a record)."""
    return prompt_format(model).name


def prompts(model: Any, processor: Any, task: str, questions: Sequence[str], template: str | None = None) -> list[str]:
    """Each row's prompt text for the model's family (``template``: instead of the family's, e.g. a VQA prompt
    from a recipe config); chat models get it as a user turn through the processor's chat template."""
    return prompt_format(model).prompt_texts(processor, task, questions, template)


def vqa_batch(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str],
              prompt: str | None = None) -> dict:
    """Training inputs for visual question answering, for the model's family (``prompt``: instead of the
    family's question template)."""
    return prompt_format(model).vqa_batch(model, processor, images, questions, answers, prompt)


def caption_batch(model: Any, processor: Any, images: Sequence[Any], captions: Sequence[str]) -> dict:
    """Training inputs for captioning, for the model's family."""
    return prompt_format(model).caption_batch(model, processor, images, captions)


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's prompts, class by class: ``len(classnames) * len(templates)`` texts."""
    return [template.format(name) for name in classnames for template in templates]


def classification_batch(model: Any, processor: Any, images: Sequence[Any], labels: Sequence[int],
                         classnames: Sequence[str], templates: Sequence[str]) -> dict[str, Any]:
    """Training inputs for a CLIP-like model: the images, every class prompt, and each image's class index.
    ``processor``: a transformers processor, or ``(tokenizer, preprocess)`` for open_clip."""
    prompts = class_prompts(classnames, templates)
    batch: dict[str, Any] = {"labels": torch.tensor(list(labels)), "num_templates": len(templates)}
    if is_open_clip(model):
        tokenizer, preprocess = processor
        return {**batch, "image": torch.stack([preprocess(image) for image in images]), "text": tokenizer(prompts)}
    encoded = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    return {**batch, **{k: encoded[k] for k in ("pixel_values", "input_ids", "attention_mask")}}
