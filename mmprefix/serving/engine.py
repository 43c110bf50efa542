"""`Engine`: one frozen model with its prefixes, running batches of requests (`Job`) as routed calls.

A batch holds jobs of one task with the same generation settings; each row is routed to its job's prefix (or
to none), so requests for different prefixes share one ``generate`` or one encoder call. The formatting and
decoding are the evaluation's (``evaluation/decode.py``, ``evaluation/contrastive.py``), so a served answer is
the answer ``mmprefix.evaluation.predict`` gives for the same input.

Tasks: ``"vqa"`` (image + question), ``"caption"`` (image), ``"text"`` (a causal LM's continuation of a
prompt), ``"image_features"``, ``"text_features"`` (unit CLIP embeddings) and ``"classify"`` (zero-shot: an
image and class names, prompt-ensembled over templates).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..architectures import is_open_clip, unwrap
from ..data.formatting import class_prompts, family
from ..evaluation import decode
from ..evaluation.batching import needs_same_length
from ..evaluation.contrastive import _ClipEncoder, _encode_texts, class_embeddings
from ..model import PrefixModel

logger = logging.getLogger(__name__)

GENERATIVE_TASKS = ("vqa", "caption", "text")
CONTRASTIVE_TASKS = ("image_features", "text_features", "classify")
TASKS = GENERATIVE_TASKS + CONTRASTIVE_TASKS

# Generation settings a request may set; decoding is always deterministic (greedy or beam search).
GENERATION_SETTINGS = ("max_new_tokens", "num_beams")
DEFAULT_TEMPLATES = ("a photo of a {}.",)

# What a job of each task must hold.
REQUIRED = {"vqa": ("image", "text"), "caption": ("image",), "text": ("text",), "image_features": ("image",),
            "text_features": ("text",), "classify": ("image", "classnames")}

# BLIP ships one class per head; the other families do every generative task their inputs allow.
BLIP_HEADS = {"BlipForQuestionAnswering": ("vqa",), "BlipForConditionalGeneration": ("caption",)}


def model_tasks(model: Any) -> tuple[str, ...]:
    """The tasks a (wrapped) model serves."""
    base = unwrap(model)
    if is_open_clip(base) or (hasattr(base, "get_image_features") and hasattr(base, "get_text_features")):
        return CONTRASTIVE_TASKS
    kind = family(base)
    if kind == "blip":
        return BLIP_HEADS.get(type(base).__name__, ())
    if kind == "blip2":
        return ("vqa", "caption")
    return ("text",) if hasattr(base, "generate") else ()


@dataclass
class Job:
    """One request: a task, the prefix its row is routed to (None: the base model) and its inputs.

    ``generation``: sorted ``(setting, value)`` pairs (see `GENERATION_SETTINGS`). ``on_text``: called in the
    engine's thread with each new piece of generated text (greedy jobs stream word by word, beam search jobs get
    the whole answer at the end)."""

    task: str
    prefix: str | None = None
    image: Any = None
    text: str | None = None
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    generation: tuple[tuple[str, Any], ...] = ()
    on_text: Callable[[str], None] | None = field(default=None, repr=False)


class Engine:
    """Runs batches of jobs on one frozen `PrefixModel` (``processor``: its processor, tokenizer, or open_clip's
    ``(tokenizer, preprocess)``). ``max_new_tokens`` and ``num_beams`` bound what a job may ask for."""

    def __init__(self, model: PrefixModel, processor: Any, name: str = "model", max_new_tokens: int = 64,
                 num_beams: int = 4) -> None:
        if not isinstance(model, PrefixModel):
            raise ValueError(f"an Engine serves a PrefixModel, got {type(model).__name__}; wrap it with PrefixModel(model)")
        self.model, self.processor, self.name = model.eval(), processor, name
        self.tasks = model_tasks(model)
        if not self.tasks:
            raise ValueError(f"{type(unwrap(model)).__name__} is not a model mmprefix can serve (no task fits it)")
        self.limits = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        tokenizer = processor[0] if is_open_clip(unwrap(model)) else getattr(processor, "tokenizer", processor)
        self.tokenizer = tokenizer
        # Requests are checked in the callers' threads while batches run: a fast tokenizer's padding state is not
        # safe to share across threads, so counting uses its own copy.
        self._counter, self._counting = copy.deepcopy(tokenizer), threading.Lock()

    # -- checks and grouping, in the caller's thread ------------------------------------------------------
    def settings(self, **requested: Any) -> tuple[tuple[str, Any], ...]:
        """Generation settings as a `Job` holds them; None values are left out. Unknown settings, sampling or
        values beyond the limits raise ValueError."""
        unknown = sorted(set(requested) - set(GENERATION_SETTINGS))
        if unknown:
            raise ValueError(f"unknown generation setting {unknown[0]!r}; settings are {list(GENERATION_SETTINGS)}")
        out = []
        for key, value in sorted(requested.items()):
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.limits[key]:
                raise ValueError(f"{key} must be an integer from 1 to {self.limits[key]}, got {value!r}")
            out.append((key, value))
        return tuple(out)

    def token_count(self, text: str) -> int:
        with self._counting:
            if is_open_clip(unwrap(self.model)):
                return int((self._counter([text])[0] != 0).sum())
            return len(self._counter(text)["input_ids"])

    def group(self, job: Job) -> Hashable:
        """Jobs with equal keys share a batch: same task and settings (and, where padding would change the
        answer, the same question length)."""
        if job.task not in self.tasks:
            raise ValueError(f"this {type(unwrap(self.model)).__name__} serves {list(self.tasks)}, not {job.task!r}")
        missing = [name for name in REQUIRED[job.task] if not getattr(job, name)]
        if missing:
            raise ValueError(f"a {job.task!r} job needs {' and '.join(REQUIRED[job.task])}; it has no {missing[0]}")
        length = self.token_count(job.text) if needs_same_length(job.task, self.model) else None
        return job.task, job.generation, length

    # -- batches, in the batcher's thread -----------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """One result per job: generated text, a feature list, or ``{"label", "scores"}``."""
        task = jobs[0].task
        prefixes = [job.prefix for job in jobs]
        if task in GENERATIVE_TASKS:
            return self._generate(task, jobs, prefixes)
        encoder = _ClipEncoder(self.model, self.processor)
        if task == "text_features":
            return _rows(_encode_texts(encoder, [job.text for job in jobs], len(jobs), prefixes))
        with self.model.using(prefixes):
            images = encoder.images([job.image for job in jobs])
        if task == "image_features":
            return _rows(images)
        return self._classify(encoder, jobs, images)

    def _generate(self, task: str, jobs: Sequence[Job], prefixes: list[str | None]) -> list[str]:
        settings = dict(jobs[0].generation)
        streaming = [job.on_text for job in jobs]
        streamer = None
        if any(streaming) and settings.get("num_beams", 1) == 1:  # transformers streams greedy decoding only
            streamer = settings["streamer"] = RowStreamer(self.tokenizer, streaming)
        if task == "vqa":
            texts = decode.answer_questions(self.model, self.processor, [j.image for j in jobs], [j.text for j in jobs],
                                            prefix=prefixes, **settings)
        elif task == "caption":
            texts = decode.caption_images(self.model, self.processor, [j.image for j in jobs], prefix=prefixes, **settings)
        else:
            texts = decode.complete_texts(self.model, self.tokenizer, [j.text for j in jobs], prefix=prefixes, **settings)
        listeners = streamer.callbacks if streamer is not None else streaming  # the streamer drops failing ones
        for row, (text, on_text) in enumerate(zip(texts, listeners)):
            sent = streamer.sent[row] if streamer is not None else ""
            if on_text is not None and text.startswith(sent) and len(text) > len(sent):
                _notify(on_text, text[len(sent) :], row)  # the rest of the answer, as decoded for the whole batch
        return texts

    def _classify(self, encoder: _ClipEncoder, jobs: Sequence[Job], images: torch.Tensor) -> list[dict]:
        texts, owners = [], []
        for job in jobs:
            prompts = class_prompts(job.classnames, job.templates)
            texts += prompts
            owners += [job.prefix] * len(prompts)
        text = _encode_texts(encoder, texts, len(texts), owners)
        scale = unwrap(self.model).logit_scale.exp().float()
        out, start = [], 0
        for job, image in zip(jobs, images):
            count = len(job.classnames) * len(job.templates)
            classes = class_embeddings(text[start : start + count], len(job.templates))
            start += count
            probabilities = (scale * image @ classes.T).softmax(-1).tolist()
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            out.append({"label": job.classnames[best], "scores": dict(zip(job.classnames, probabilities))})
        return out


def _notify(callback: Callable[[str], None], piece: str, row: int) -> bool:
    """Hand a piece of text to a listener; False (logged) if it raised: one listener must not fail the batch."""
    try:
        callback(piece)
        return True
    except Exception:  # noqa: BLE001
        logger.exception("the streaming listener of row %d failed; it gets no more text", row)
        return False


def _rows(features: torch.Tensor) -> list[list[float]]:
    return features.float().cpu().tolist()


class RowStreamer(BaseStreamer):
    """Hands each row of a batched greedy ``generate`` its own text as it grows, whole words at a time (a word
    is sent once the next one has started, so later tokens never change what was sent)."""

    def __init__(self, tokenizer: Any, callbacks: Sequence[Callable[[str], None] | None]) -> None:
        self.tokenizer, self.callbacks = tokenizer, list(callbacks)
        self.tokens: list[list[int]] = [[] for _ in self.callbacks]
        self.sent = [""] * len(self.callbacks)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt (or the decoder start)
            self._prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.callbacks[row] is None:
                continue
            self.tokens[row].append(token)
            text = decode._decode(self.tokenizer, torch.tensor([self.tokens[row]]))[0]
            whole = text[: text.rfind(" ")] if " " in text else ""
            if len(whole) > len(self.sent[row]) and whole.startswith(self.sent[row]):
                piece, self.sent[row] = whole[len(self.sent[row]) :], whole
                if not _notify(self.callbacks[row], piece, row):
                    self.callbacks[row] = None

    def end(self) -> None:
        """The rest of each answer is sent by the engine, from the decoded batch."""
