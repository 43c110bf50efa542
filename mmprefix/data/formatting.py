"""Turning samples into model inputs, per task and model family: what the recipes train on and what the
evaluation decodes from (``evaluation/decode.py``), so that both see exactly the same formatting. The family
record's ``prompt_format`` chooses:

* ``"blip"``: decoder text starts with the tokenizer's bos token ([DEC]), as BLIP's ``generate`` starts it, and
  ends with [SEP]; padding is ignored in the loss.
* ``"blip2"`` (BLIP-2, InstructBLIP): the processor inserts the image tokens; VQA uses the prompt
  ``"Question: {q} Answer:"``; the answer (or caption) follows the prompt and only it is scored.
* ``"chat"`` (LLaVA, Qwen-VL, SmolVLM, Idefics, Gemma 3, ...): one user turn, the image and the question (or a
  caption instruction), through the processor's chat template, which puts the family's image placeholders
  where the model expects them; the answer and the end of text follow the opened assistant turn, only they are
  scored.
* ``"paligemma"``: PaliGemma's task prefixes (``"answer en {q}"``, ``"caption en"``); the processor appends
  the target as its ``suffix`` and makes the labels.
* Causal language models: prompt then target, only the target scored.
* CLIP-like models (transformers CLIP or open_clip): each class is named by prompts from templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..architectures import family_of, is_open_clip, unwrap

IGNORE = -100


VQA_PROMPT = "Question: {question} Answer:"
# prompt format -> task -> the prompt text, with the question where it has one
PROMPTS = {
    "blip2": {"vqa": VQA_PROMPT, "caption": ""},
    "chat": {"vqa": "{question}", "caption": "Describe this image in one sentence."},
    "paligemma": {"vqa": "answer en {question}", "caption": "caption en"},
}


def family(model: Any) -> str:
    """The prompt format of the model's family record: ``"blip"``, ``"blip2"`` (BLIP-2 and InstructBLIP), ... or
    ``"lm"`` (plain language models, and models without a record)."""
    record = family_of(unwrap(model)) if hasattr(unwrap(model), "config") else None
    return (record.prompt_format if record is not None else None) or "lm"


def chat_prompt(processor: Any, text: str) -> str:
    """One user turn, an image then ``text``, through the processor's chat template (which puts the family's
    image placeholders where the model expects them), with the assistant's turn opened."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded)


def _words(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def blip_decoder_text(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs ``[bos] text [SEP]`` padded, and labels with the padding ignored."""
    rows = [[tokenizer.bos_token_id, *_words(tokenizer, t), tokenizer.sep_token_id] for t in texts]
    ids = _pad(rows, tokenizer.pad_token_id)
    labels = _pad(rows, IGNORE)
    return ids, labels


def prompt_and_target(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Causal-LM training rows ``prompt target </s>``: labels score the target only; padding on the right."""
    ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        head = tokenizer(prompt)["input_ids"]
        tail = [*_words(tokenizer, " " + target), tokenizer.eos_token_id]
        ids.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    input_ids = _pad(ids, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": _pad([[1] * len(r) for r in ids], 0), "labels": _pad(labels, IGNORE)}


def prompts(model: Any, processor: Any, task: str, questions: Sequence[str], template: str | None = None) -> list[str]:
    """Each row's prompt text for the model's family (``template``: instead of the family's, e.g. a VQA prompt
    from a recipe config); chat models get it as a user turn through the processor's chat template."""
    kind = family(model)
    template = PROMPTS.get(kind, PROMPTS["blip2"])[task] if template is None else template
    texts = [template.format(question=q) for q in questions]
    return [chat_prompt(processor, t) for t in texts] if kind == "chat" else texts


def vqa_batch(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str],
              prompt: str | None = None) -> dict:
    """Training inputs for visual question answering, for the model's family (``prompt``: instead of the
    family's question template)."""
    kind = family(model)
    tokenizer = _tokenizer(processor)
    if kind == "blip":
        batch = dict(processor(images=list(images), text=list(questions), return_tensors="pt", padding=True))
        batch["decoder_input_ids"], batch["labels"] = blip_decoder_text(tokenizer, answers)
        return batch
    return _targets_after_prompts(model, processor, images, prompts(model, processor, "vqa", questions, prompt), answers)


def caption_batch(model: Any, processor: Any, images: Sequence[Any], captions: Sequence[str]) -> dict:
    """Training inputs for captioning, for the model's family."""
    kind = family(model)
    if kind == "blip":
        batch = dict(processor(images=list(images), return_tensors="pt"))
        batch["input_ids"], batch["labels"] = blip_decoder_text(_tokenizer(processor), captions)
        batch["attention_mask"] = (batch["input_ids"] != _tokenizer(processor).pad_token_id).long()
        return batch
    texts = prompts(model, processor, "caption", [""] * len(captions))
    return _targets_after_prompts(model, processor, images, texts, captions)


def _targets_after_prompts(model: Any, processor: Any, images: Sequence[Any], texts: Sequence[str],
                           targets: Sequence[str]) -> dict:
    kind = family(model)
    if kind == "paligemma":  # the processor appends the suffix and its end of text, and scores only them
        return dict(processor(images=per_row(images), text=list(texts), suffix=list(targets), return_tensors="pt",
                              padding=True))
    if kind == "chat":
        return _chat_batch(processor, images, texts, targets)
    return _prompted_batch(processor, images, texts, targets)


def per_row(images: Sequence[Any]) -> list[list[Any]]:
    """One list of images per row: what every multi-image processor takes."""
    return [[image] for image in images]


def image_prompt_inputs(processor: Any, images: Sequence[Any], texts: Sequence[str]) -> dict[str, Any]:
    """Everything the processor makes for each row's image and prompt text (pixels, image grids, masks, ...),
    padded on the left: generation continues every row at its end."""
    return dict(processor(images=per_row(images), text=list(texts), return_tensors="pt", padding=True,
                          padding_side="left"))


def _chat_batch(processor: Any, images: Sequence[Any], texts: Sequence[str], targets: Sequence[str]) -> dict:
    """The processor's inputs for ``prompt target <eos>``; labels score the target and the end of text only."""
    tokenizer = _tokenizer(processor)
    full = [f"{t}{'' if t.endswith((' ', chr(10))) else ' '}{target}{tokenizer.eos_token}" for t, target in zip(texts, targets)]
    batch = dict(processor(images=per_row(images), text=full, return_tensors="pt", padding=True, padding_side="right"))
    heads = processor(images=per_row(images), text=list(texts), return_tensors="pt", padding=True)["attention_mask"].sum(1)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    labels[torch.arange(labels.shape[1])[None] < heads[:, None]] = IGNORE  # right padding: the prompt comes first
    batch["labels"] = labels
    return batch


def _image_prompts(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Pixel values and each row's ids: the processor's image tokens and the prompt (BLIP-2's processor adds
    the image tokens only when it is given the images too), without its padding."""
    encoded = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    rows = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    return encoded["pixel_values"], rows


def _prompted_batch(processor: Any, images: Sequence[Any], prompts: Sequence[str], targets: Sequence[str]) -> dict:
    """BLIP-2: the processor's image tokens and prompt, then the target; only the target is scored."""
    tokenizer = _tokenizer(processor)
    pixel_values, heads = _image_prompts(processor, images, prompts)
    tails = [[*_words(tokenizer, " " + t), tokenizer.eos_token_id] for t in targets]
    ids = [h + t for h, t in zip(heads, tails)]
    labels = [[IGNORE] * len(h) + t for h, t in zip(heads, tails)]
    return {
        "pixel_values": pixel_values,
        "input_ids": _pad(ids, tokenizer.pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "labels": _pad(labels, IGNORE),
    }


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
