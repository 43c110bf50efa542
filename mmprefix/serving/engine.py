"""`Engine`: one frozen model with its prefixes, checking requests (`Job`) and running them as routed calls.

Generative requests whose model has a stepper (``steppers.py``) are decoded step by step with others
(``scheduler.py``, step-level batching); everything else runs as request-level batches (`Engine.run`): jobs
of one task with the same settings, each row routed to its job's prefix (or to none), in one ``generate`` or one
encoder call. The formatting and decoding are the evaluation's (``evaluation/decode.py``,
``evaluation/contrastive.py``), so a served answer is the answer ``mmprefix.evaluation.predict`` gives for the
same input.

Tasks: ``"vqa"`` (image + question), ``"caption"`` (image), ``"text"`` (a causal LM's continuation of a
prompt), ``"chat"`` (a conversation through the processor's chat template), ``"image_features"``,
``"text_features"`` (unit CLIP embeddings) and ``"classify"`` (zero-shot: an image and class names,
prompt-ensembled over templates).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..core.architectures import is_open_clip, unwrap
from ..data.formats import prompt_format
from ..data.formatting import class_prompts
from ..evaluation import decode
from ..evaluation.batching import needs_same_length
from ..evaluation.contrastive import _ClipEncoder, _encode_texts, class_embeddings
from ..core.model import PrefixModel
from ..core.store import PrefixStore
from .generate import generate_batch
from .inputs import preparable, prepare
from .jobs import DEFAULT_TEMPLATES, Completion, Job
from .sampling import check_sampling, check_stop
from .steppers import eos_ids, pad_id, stepper_for

logger = logging.getLogger(__name__)

GENERATIVE_TASKS = ("vqa", "caption", "text", "chat")
CONTRASTIVE_TASKS = ("image_features", "text_features", "classify")
TASKS = GENERATIVE_TASKS + CONTRASTIVE_TASKS

# Generation settings a request may set (see `Engine.settings`).
GENERATION_SETTINGS = ("max_new_tokens", "num_beams", "temperature", "top_p", "seed", "stop")

# What a job of each task must hold.
REQUIRED = {"vqa": ("image", "text"), "caption": ("image",), "text": ("text",), "chat": ("messages",),
            "image_features": ("image",), "text_features": ("text",), "classify": ("image", "classnames")}

__all__ = ["CONTRASTIVE_TASKS", "DEFAULT_TEMPLATES", "GENERATIVE_TASKS", "TASKS", "Completion", "Engine", "Job",
           "model_tasks"]


def model_tasks(model: Any, processor: Any = None) -> tuple[str, ...]:
    """The tasks a (wrapped) model serves; ``"chat"`` when its ``processor`` (or tokenizer) has a chat
    template."""
    base = unwrap(model)
    if is_open_clip(base) or (hasattr(base, "get_image_features") and hasattr(base, "get_text_features")):
        return CONTRASTIVE_TASKS
    return prompt_format(base).serving_tasks(base, processor)


class Engine:
    """Checks and runs jobs on one frozen `PrefixModel` (``processor``: its processor, tokenizer, or open_clip's
    ``(tokenizer, preprocess)``). ``max_new_tokens`` and ``max_beams`` bound what a job may ask for.

    ``stepper``: how its generative jobs decode step by step (None, with the reason in ``why_not_stepped``,
    when the model cannot: they then run request by request)."""

    def __init__(self, model: PrefixModel, processor: Any, name: str = "model", max_new_tokens: int = 64,
                 max_beams: int = 4) -> None:
        if not isinstance(model, PrefixModel):
            raise ValueError(f"an Engine serves a PrefixModel, got {type(model).__name__}; wrap it with PrefixModel(model)")
        self.model, self.processor, self.name = model.eval(), processor, name
        self.tasks = model_tasks(model, processor)
        if not self.tasks:
            raise ValueError(f"{type(unwrap(model)).__name__} is not a model mmprefix can serve (no task fits it)")
        self.limits = {"max_new_tokens": max_new_tokens, "num_beams": max_beams}  # the most a job may ask for
        tokenizer = processor[0] if is_open_clip(unwrap(model)) else getattr(processor, "tokenizer", processor)
        self.tokenizer = tokenizer
        # Requests are checked in the callers' threads while batches run: a fast tokenizer's padding state is not
        # safe to share across threads, so checks use their own copy, one thread at a time.
        self._checker, self._checking = copy.deepcopy(processor), threading.Lock()
        generative = any(task in GENERATIVE_TASKS for task in self.tasks)
        self.stepper, self.why_not_stepped = stepper_for(model, tokenizer) if generative else (None, "it generates nothing")
        self.eos = eos_ids(model, tokenizer) if generative else ()
        self.pad = pad_id(model, tokenizer) if generative else None

    # -- checks, in the caller's thread ---------------------------------------------------------------------
    def settings(self, **requested: Any) -> tuple[tuple[str, Any], ...]:
        """Generation settings as a `Job` holds them (sorted pairs; None values and neutral ones left out):
        ``max_new_tokens``, ``num_beams`` (within the engine's limits), ``temperature`` and ``top_p`` (greedy
        without them; see `sampling.check_sampling`), ``seed`` (for sampling), ``stop`` (up to 4 strings).
        Unknown settings or values out of range raise ValueError."""
        unknown = sorted(set(requested) - set(GENERATION_SETTINGS))
        if unknown:
            raise ValueError(f"unknown generation setting {unknown[0]!r}; settings are {list(GENERATION_SETTINGS)}")
        out = {}
        for key in ("max_new_tokens", "num_beams"):
            value = requested.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.limits[key]:
                raise ValueError(f"{key} must be an integer from 1 to {self.limits[key]}, got {value!r}")
            out[key] = value
        temperature, top_p = check_sampling(requested.get("temperature"), requested.get("top_p"))
        seed = requested.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if temperature > 0:
            if out.get("num_beams", 1) > 1:
                raise ValueError("num_beams (beam search) and sampling (temperature, top_p) cannot be combined")
            out.update(temperature=temperature, top_p=top_p, **({"seed": seed} if seed is not None else {}))
        stop = check_stop(requested.get("stop"))
        if stop:
            out["stop"] = stop
        return tuple(sorted(out.items()))

    def token_count(self, text: str) -> int:
        with self._checking:
            if is_open_clip(unwrap(self.model)):
                return int((self._checker[0]([text])[0] != 0).sum())
            return len(getattr(self._checker, "tokenizer", self._checker)(text)["input_ids"])

    def group(self, job: Job) -> Hashable:
        """Check a job, make its model inputs (``job.prepared``: `inputs.Prepared`, for generative jobs of BLIP,
        chat VLMs and causal LMs) and return its group key: jobs with equal keys can share a request-level batch
        (same task and settings, and where padding would change the answer, the same question length).
        Raises ValueError (``inputs.ContextTooLong`` when the prompt and the tokens asked for do not fit)."""
        if job.task not in self.tasks:
            raise ValueError(f"this {type(unwrap(self.model)).__name__} serves {list(self.tasks)}, not {job.task!r}")
        missing = [name for name in REQUIRED[job.task] if not getattr(job, name)]
        if missing:
            raise ValueError(f"a {job.task!r} job needs {' and '.join(REQUIRED[job.task])}; it has no {missing[0]}")
        if preparable(self.model, job.task):
            store = self._store(job.prefix)
            extra = store.num_virtual_tokens if store is not None and store.config.position_offset else 0
            with self._checking:
                job.prepared = prepare(unwrap(self.model), self._checker, job, self.limits["max_new_tokens"], extra)
        if job.setting("temperature") and not self.steps(job):  # transformers' generate would sample from one RNG
            stepping = self.stepper is not None and job.prepared is not None
            why = "its prefix is a soft prompt or image-conditioned" if stepping else self.why_not_stepped
            raise ValueError(f"sampling (temperature, top_p) needs step-level decoding, which this request cannot "
                             f"have: {why}; use greedy decoding or beam search")
        length = self.token_count(job.text) if needs_same_length(job.task, self.model) else None
        limit = job.prepared.limit if job.prepared is not None else None
        return job.task, job.generation, length, limit

    def steps(self, job: Job) -> bool:
        """Whether ``job`` decodes step by step: a prepared generative job of a model with a stepper, without
        beam search, whose prefix (if any) is a prefix, neither a soft prompt nor image-conditioned."""
        if self.stepper is None or job.prepared is None or job.setting("num_beams", 1) > 1:
            return False
        store = self._store(job.prefix)
        # A conditioned prefix reads its rows' images in every call; a decoding step passes none
        return job.prefix is None or (isinstance(store, PrefixStore) and store.condition is None)

    def _store(self, name: str | None) -> Any:
        return self.model.prefixes[name] if name is not None and name in self.model.prefixes else None

    def decode_tokens(self, tokens: list[int]) -> str:
        """Generated tokens as the evaluation decodes them."""
        return decode._decode(self.tokenizer, torch.tensor([tokens]))[0]

    # -- request-level batches, in the serving thread ----------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """One result per job: a `Completion`, a feature list, or ``{"label", "scores"}``."""
        task = jobs[0].task
        if task in GENERATIVE_TASKS:
            return generate_batch(self, jobs)
        prefixes = [job.prefix for job in jobs]
        encoder = _ClipEncoder(self.model, self.processor)
        if task == "text_features":
            return _rows(_encode_texts(encoder, [job.text for job in jobs], len(jobs), prefixes))
        with self.model.using(prefixes):
            images = encoder.images([job.image for job in jobs])
        if task == "image_features":
            return _rows(images)
        return self._classify(encoder, jobs, images)

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


def _rows(features: torch.Tensor) -> list[list[float]]:
    return features.float().cpu().tolist()
