"""Turning samples into model inputs and model outputs into text, per task and model family.

Shared by the recipes, the evaluation harness and the embedded backbones' pretraining, so that a model is
trained and evaluated on exactly the same formatting:

* BLIP: decoder text starts with the tokenizer's bos token ([DEC]), as BLIP's ``generate`` starts it, and
  ends with [SEP]; padding is ignored in the loss.
* BLIP-2 and InstructBLIP: the processor inserts the image tokens; VQA uses the prompt
  ``"Question: {q} Answer:"``; the answer (or caption) follows the prompt and only it is scored.
* Causal language models: prompt then target, only the target scored; generation reads after the prompt.
* CLIP-like models (transformers CLIP or open_clip): each class is named by prompts from templates, and an
  image's class logits are the model's own scaled similarities to each class's mean prompt embedding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
VQA_PROMPT = "Question: {question} Answer:"


def family(model: Any) -> str:
    """``"blip"``, ``"blip2"`` (BLIP-2 and InstructBLIP) or ``"lm"``, from the model's config."""
    model = getattr(model, "base_model", model) if type(model).__name__ == "PrefixModel" else model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "blip":
        return "blip"
    if model_type in ("blip-2", "instructblip"):
        return "blip2"
    return "lm"


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


def vqa_batch(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str],
              prompt: str = VQA_PROMPT) -> dict:
    """Training inputs for visual question answering, for the model's family (``prompt``: BLIP-2's)."""
    kind = family(model)
    tokenizer = _tokenizer(processor)
    if kind == "blip":
        batch = dict(processor(images=list(images), text=list(questions), return_tensors="pt", padding=True))
        batch["decoder_input_ids"], batch["labels"] = blip_decoder_text(tokenizer, answers)
        return batch
    prompts = [prompt.format(question=q) for q in questions]
    return _prompted_batch(processor, images, prompts, answers)


def caption_batch(model: Any, processor: Any, images: Sequence[Any], captions: Sequence[str]) -> dict:
    """Training inputs for captioning, for the model's family."""
    kind = family(model)
    if kind == "blip":
        batch = dict(processor(images=list(images), return_tensors="pt"))
        batch["input_ids"], batch["labels"] = blip_decoder_text(_tokenizer(processor), captions)
        batch["attention_mask"] = (batch["input_ids"] != _tokenizer(processor).pad_token_id).long()
        return batch
    return _prompted_batch(processor, images, [""] * len(captions), captions)


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
                     prompt: str = VQA_PROMPT, **generate: Any) -> list[str]:
    """Generated answers, decoded without special tokens (``prompt``: BLIP-2's question template)."""
    kind = family(model)
    tokenizer = _tokenizer(processor)
    settings = {"max_new_tokens": 8, "num_beams": 1, **generate}
    if kind == "blip":
        inputs = processor(images=list(images), text=list(questions), return_tensors="pt", padding=True)
        return _decode(tokenizer, model.generate(**_on_device(inputs, model), **settings))
    prompts = [prompt.format(question=q) for q in questions]
    return _generate_after_prompt(model, processor, images, prompts, settings)


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
    return _generate_after_prompt(model, processor, images, [""] * len(images), settings)


def _generate_after_prompt(model: Any, processor: Any, images, prompts, settings) -> list[str]:
    tokenizer = _tokenizer(processor)
    pixel_values, rows = _image_prompts(processor, images, prompts)
    ids = _pad(rows, tokenizer.pad_token_id, left=True)
    mask = _pad([[1] * len(r) for r in rows], 0, left=True)
    inputs = _on_device({"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}, model)
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


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's prompts, class by class: ``len(classnames) * len(templates)`` texts."""
    return [template.format(name) for name in classnames for template in templates]


def classification_batch(processor: Any, images: Sequence[Any], labels: Sequence[int], classnames: Sequence[str],
                         templates: Sequence[str]) -> dict[str, Any]:
    """Training inputs for a CLIP-like model: the images, every class prompt, and each image's class index.
    ``processor``: a transformers processor, or ``(tokenizer, preprocess)`` for open_clip."""
    prompts = class_prompts(classnames, templates)
    batch: dict[str, Any] = {"labels": torch.tensor(list(labels)), "num_templates": len(templates)}
    if isinstance(processor, (tuple, list)):
        tokenizer, preprocess = processor
        return {**batch, "image": torch.stack([preprocess(image) for image in images]), "text": tokenizer(prompts)}
    encoded = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    return {**batch, **{k: encoded[k] for k in ("pixel_values", "input_ids", "attention_mask")}}


def classification_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``[images, classes]`` logits through the model's ``forward`` (so that DDP synchronises gradients): the
    model's logit scale times the cosine similarity of each image with each class, a class being the
    normalised mean of its templates' unit text embeddings, as zero-shot evaluation ranks them."""
    if "image" in batch:  # open_clip: forward(image, text) -> features and the exponentiated logit scale
        out = model(image=batch["image"], text=batch["text"])
        image, text, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
            if isinstance(out, dict) else out[:3]
    else:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
        image, text = out.image_embeds, out.text_embeds
        scale = getattr(model, "module", model).logit_scale.exp()  # DDP keeps the model in .module
    text = F.normalize(text, dim=-1)
    classes = F.normalize(text.view(-1, batch["num_templates"], text.shape[-1]).mean(1), dim=-1)
    return scale * F.normalize(image, dim=-1) @ classes.T


def classification_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of :func:`classification_logits` against the labels (CoOp's objective)."""
    return F.cross_entropy(classification_logits(model, batch), batch["labels"])
