"""One object per prompt format: how a family of models reads a task's inputs, for training, generation and
serving. A family record names its format (``Family.prompt_format``); `prompt_format` finds the object.

* `Blip` (``"blip"``): the decoder's text starts with the tokenizer's bos token ([DEC]), as BLIP's ``generate``
  starts it, and ends with [SEP]; padding is ignored in the loss. VQA reads the question in the text encoder.
* `Blip2` (``"blip2"``: BLIP-2, InstructBLIP): the processor inserts the image tokens; VQA uses the prompt
  ``"Question: {q} Answer:"``; the answer (or caption) follows the prompt and only it is scored.
* `Chat` (``"chat"``: LLaVA, Qwen-VL, SmolVLM, Idefics, Gemma 3, ...): one user turn, the image and the question
  (or a caption instruction), through the processor's chat template, which puts the family's image placeholders
  where the model expects them; the answer and the end of text follow the opened assistant turn, only they are
  scored.
* `PaliGemma` (``"paligemma"``): PaliGemma's task prefixes (``"answer en {q}"``, ``"caption en"``); the processor
  appends the target as its ``suffix`` and makes the labels.
* `LanguageModel` (``"lm"``: causal language models, and models with no record): prompt then target, only the
  target scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.architectures import family_of, unwrap
from ..core.processors import chat_prompt

IGNORE = -100
VQA_PROMPT = "Question: {question} Answer:"


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded)


def words(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def per_row(images: Sequence[Any]) -> list[list[Any]]:
    """One list of images per row: what every multi-image processor takes."""
    return [[image] for image in images]


def image_prompt_inputs(processor: Any, images: Sequence[Any], texts: Sequence[str]) -> dict[str, Any]:
    """Everything the processor makes for each row's image and prompt text (pixels, image grids, masks, ...),
    padded on the left: generation continues every row at its end."""
    return dict(processor(images=per_row(images), text=list(texts), return_tensors="pt", padding=True,
                          padding_side="left"))


def prompt_and_target(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Causal-LM training rows ``prompt target </s>``: labels score the target only; padding on the right."""
    ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        head = tokenizer(prompt)["input_ids"]
        tail = [*words(tokenizer, " " + target), tokenizer.eos_token_id]
        ids.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    return {"input_ids": pad_rows(ids, tokenizer.pad_token_id), "attention_mask": pad_rows([[1] * len(r) for r in ids], 0),
            "labels": pad_rows(labels, IGNORE)}


def generate_after(model: Any, tokenizer: Any, inputs: dict[str, Any], settings: dict[str, Any]) -> torch.Tensor:
    """``model.generate(**inputs)`` with the tokenizer's padding and end of text; the tokens after the prompt
    (decoder-only language models return the prompt too)."""
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    ids = inputs["input_ids"]
    if out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]
    return out


class PromptFormat:
    """How one family of models reads a task (the base: a prompt, then the target).

    ``prompts``: task -> prompt template (``{question}`` where it has one). ``same_length_vqa``: a VQA generation
    batch must hold questions of one token length. ``pads_left``: how a generation batch pads its prompts.
    ``stepping``: how serving decodes it step by step (``"causal"``; ``"cross"``: a text decoder that cross-attends
    to each row's image or question states, BLIP's; None: request by request).
    ``chat_parts``: its chat template takes content parts (images beside text), not one string.
    ``continues_prompt``: generation continues the prompt (False: an encoder reads it, BLIP's question, and the
    decoder starts from its own start token)."""

    name = "lm"
    prompts: dict[str, str] = {"vqa": VQA_PROMPT, "caption": ""}
    same_length_vqa = False
    pads_left = True
    stepping: str | None = "causal"
    chat_parts = False
    continues_prompt = True

    # -- prompts and training ----------------------------------------------------------------------------
    def prompt_texts(self, processor: Any, task: str, questions: Sequence[str], template: str | None = None) -> list[str]:
        """Each row's prompt text (``template``: instead of the format's, e.g. a VQA prompt from a recipe)."""
        template = self.prompts[task] if template is None else template
        return [template.format(question=q) for q in questions]

    def vqa_batch(self, model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                  answers: Sequence[str], prompt: str | None = None) -> dict:
        texts = self.prompt_texts(processor, "vqa", questions, prompt)
        return self.targets_after_prompts(processor, images, texts, answers)

    def caption_batch(self, model: Any, processor: Any, images: Sequence[Any], captions: Sequence[str]) -> dict:
        texts = self.prompt_texts(processor, "caption", [""] * len(captions))
        return self.targets_after_prompts(processor, images, texts, captions)

    def targets_after_prompts(self, processor: Any, images: Sequence[Any], texts: Sequence[str],
                              targets: Sequence[str]) -> dict:
        """The processor's image tokens and prompt, then the target; only the target is scored."""
        tokenizer = tokenizer_of(processor)
        pixel_values, heads = _image_prompts(processor, images, texts)
        tails = [[*words(tokenizer, " " + t), tokenizer.eos_token_id] for t in targets]
        ids = [h + t for h, t in zip(heads, tails)]
        labels = [[IGNORE] * len(h) + t for h, t in zip(heads, tails)]
        return {"pixel_values": pixel_values, "input_ids": pad_rows(ids, tokenizer.pad_token_id),
                "attention_mask": pad_rows([[1] * len(r) for r in ids], 0), "labels": pad_rows(labels, IGNORE)}

    # -- generation ----------------------------------------------------------------------------------------
    def generation_inputs(self, model: Any, processor: Any, task: str, images: Sequence[Any],
                          questions: Sequence[str], template: str | None = None) -> dict[str, Any]:
        """The inputs ``generate`` starts from for ``task`` (``"vqa"`` or ``"caption"``)."""
        return image_prompt_inputs(processor, images, self.prompt_texts(processor, task, questions, template))

    def generate(self, model: Any, processor: Any, task: str, inputs: dict[str, Any],
                 settings: dict[str, Any]) -> torch.Tensor:
        """The tokens generated from ``inputs`` (of ``generation_inputs``), without the prompt."""
        return generate_after(model, tokenizer_of(processor), inputs, settings)

    def decoder_start(self, model: Any, rows: int) -> dict[str, torch.Tensor]:
        """The ids a generation with no text of its own starts from (BLIP's captions)."""
        raise ValueError(f"the {self.name!r} prompt format generates after a prompt, with no start of its own")

    # -- serving ---------------------------------------------------------------------------------------------
    def serving_tasks(self, base: Any, processor: Any) -> tuple[str, ...]:
        """The generative tasks a model of this format serves."""
        chat = ("chat",) if getattr(processor, "chat_template", None) else ()
        return (("text",) + chat) if hasattr(base, "generate") else ()

    def eos_ids(self, base: Any, tokenizer: Any) -> tuple[int, ...]:
        """The tokens that end a generated row, as generation sets them."""
        return (tokenizer.eos_token_id,)

    def pad_id(self, base: Any, tokenizer: Any) -> int:
        """The token that pads prompts in a batch (its end of text if it has none: padding is masked anyway)."""
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class LanguageModel(PromptFormat):
    """Causal language models (text: `prompt_and_target`), and models with no record, which get BLIP-2's prompts."""


class _ImagePrompted(PromptFormat):
    """Vision-language models that read an image and a prompt, then write the target."""

    def serving_tasks(self, base: Any, processor: Any) -> tuple[str, ...]:
        return ("vqa", "caption")


class Blip2(_ImagePrompted):
    name, stepping = "blip2", None

    def generation_inputs(self, model: Any, processor: Any, task: str, images: Sequence[Any],
                          questions: Sequence[str], template: str | None = None) -> dict[str, Any]:
        """The processor's image tokens and prompt without padding, padded again on the left."""
        pad = tokenizer_of(processor).pad_token_id
        pixel_values, rows = _image_prompts(processor, images, self.prompt_texts(processor, task, questions, template))
        return {"pixel_values": pixel_values, "input_ids": pad_rows(rows, pad, left=True),
                "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, left=True)}


def _image_prompts(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Pixel values and each row's ids: the processor's image tokens and the prompt (BLIP-2's processor adds
    the image tokens only when it is given the images too), without its padding."""
    encoded = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    rows = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    return encoded["pixel_values"], rows


class Chat(_ImagePrompted):
    name, chat_parts = "chat", True
    prompts = {"vqa": "{question}", "caption": "Describe this image in one sentence."}

    def prompt_texts(self, processor: Any, task: str, questions: Sequence[str], template: str | None = None) -> list[str]:
        return [chat_prompt(processor, t) for t in super().prompt_texts(processor, task, questions, template)]

    def targets_after_prompts(self, processor: Any, images: Sequence[Any], texts: Sequence[str],
                              targets: Sequence[str]) -> dict:
        """The processor's inputs for ``prompt target <eos>``; labels score the target and the end of text."""
        tokenizer = tokenizer_of(processor)
        full = [f"{t}{'' if t.endswith((' ', chr(10))) else ' '}{target}{tokenizer.eos_token}"
                for t, target in zip(texts, targets)]
        batch = dict(processor(images=per_row(images), text=full, return_tensors="pt", padding=True,
                               padding_side="right"))
        heads = processor(images=per_row(images), text=list(texts), return_tensors="pt", padding=True)["attention_mask"].sum(1)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        labels[torch.arange(labels.shape[1])[None] < heads[:, None]] = IGNORE  # right padding: the prompt comes first
        batch["labels"] = labels
        return batch

    def serving_tasks(self, base: Any, processor: Any) -> tuple[str, ...]:
        return super().serving_tasks(base, processor) + (("chat",) if getattr(processor, "chat_template", None) else ())


class PaliGemma(_ImagePrompted):
    name, stepping = "paligemma", None
    prompts = {"vqa": "answer en {question}", "caption": "caption en"}

    def targets_after_prompts(self, processor: Any, images: Sequence[Any], texts: Sequence[str],
                              targets: Sequence[str]) -> dict:
        """The processor appends the suffix and its end of text, and scores only them."""
        return dict(processor(images=per_row(images), text=list(texts), suffix=list(targets), return_tensors="pt",
                              padding=True))


class Blip(PromptFormat):
    name, same_length_vqa, pads_left, stepping, continues_prompt = "blip", True, False, "cross", False

    def vqa_batch(self, model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                  answers: Sequence[str], prompt: str | None = None) -> dict:
        batch = dict(processor(images=list(images), text=list(questions), return_tensors="pt", padding=True))
        batch["decoder_input_ids"], batch["labels"] = blip_decoder_text(tokenizer_of(processor), answers)
        return batch

    def caption_batch(self, model: Any, processor: Any, images: Sequence[Any], captions: Sequence[str]) -> dict:
        tokenizer = tokenizer_of(processor)
        batch = dict(processor(images=list(images), return_tensors="pt"))
        batch["input_ids"], batch["labels"] = blip_decoder_text(tokenizer, captions)
        batch["attention_mask"] = (batch["input_ids"] != tokenizer.pad_token_id).long()
        return batch

    def generation_inputs(self, model: Any, processor: Any, task: str, images: Sequence[Any],
                          questions: Sequence[str], template: str | None = None) -> dict[str, Any]:
        if task == "vqa":  # the question goes to the text encoder; the answer decoder starts by itself
            return dict(processor(images=list(images), text=list(questions), return_tensors="pt", padding=True))
        inputs = dict(processor(images=list(images), return_tensors="pt"))
        inputs.update(self.decoder_start(model, len(images)))
        return inputs

    def decoder_start(self, model: Any, rows: int) -> dict[str, torch.Tensor]:
        """BLIP's own default start of a caption, spelled out: a soft prompt goes into input_ids, so they must
        exist."""
        text = unwrap(model).config.text_config
        ids = torch.tensor([[text.bos_token_id, text.eos_token_id]]).repeat(rows, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def generate(self, model: Any, processor: Any, task: str, inputs: dict[str, Any],
                 settings: dict[str, Any]) -> torch.Tensor:
        return model.generate(**inputs, **settings)[:, 1:]  # without the decoder's start token

    def serving_tasks(self, base: Any, processor: Any) -> tuple[str, ...]:
        """Each BLIP class serves the tasks its record loads it for (one head per class)."""
        record = family_of(base)
        return tuple(task for task, classes in record.tasks.items() if type(base).__name__ in classes)

    def eos_ids(self, base: Any, tokenizer: Any) -> tuple[int, ...]:
        return (base.config.text_config.sep_token_id,)

    def pad_id(self, base: Any, tokenizer: Any) -> int:
        return base.config.text_config.pad_token_id or 0


def blip_decoder_text(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs ``[bos] text [SEP]`` padded, and labels with the padding ignored."""
    rows = [[tokenizer.bos_token_id, *words(tokenizer, t), tokenizer.sep_token_id] for t in texts]
    return pad_rows(rows, tokenizer.pad_token_id), pad_rows(rows, IGNORE)


FORMATS: dict[str, PromptFormat] = {f.name: f for f in (Blip(), Blip2(), Chat(), PaliGemma(), LanguageModel())}


def prompt_format(model: Any) -> PromptFormat:
    """The prompt format of the model's family record (a model with no record: ``"lm"``)."""
    base = unwrap(model)
    record = family_of(base) if hasattr(base, "config") else None
    return FORMATS[(record.prompt_format if record is not None else None) or "lm"]
