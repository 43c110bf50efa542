"""Request-level generation: a batch of jobs of one task and settings through transformers' ``generate`` (one
routed call, each row with its job's prefix), as the evaluation decodes (``evaluation/decode.py``).

What request-level batching runs (``PrefixService(batching="request")``), and what step-level batching runs
for requests that cannot step (beam search, models without a stepper). Each row's tokens go through the same
`Finisher` as a stepped row's, so ``stop`` sequences, ``finish_reason`` and token counts agree between the two.
Greedy rows stream token by token as ``generate`` produces them; beam search rows get their answer at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..data.formats import prompt_format
from ..evaluation import decode
from .inputs import padded_batch
from .jobs import Completion, Job, notify
from .sampling import Finisher

STOPPING = ("stop", "temperature", "top_p", "seed")  # settings the finisher (or a stepper) applies, not generate


def generate_batch(engine: Any, jobs: Sequence[Job]) -> list[Completion]:
    """One `Completion` per job (all of one task, with equal settings)."""
    task = jobs[0].task
    settings = {k: v for k, v in jobs[0].generation if k not in STOPPING}
    prepared = jobs[0].prepared
    if prepared is not None:  # the limit within the model's context (equal across a batch: part of its group)
        settings["max_new_tokens"] = prepared.limit
    settings.setdefault("max_new_tokens", decode.DEFAULT_NEW_TOKENS.get(task, engine.limits["max_new_tokens"]))
    limit = settings["max_new_tokens"]
    finishers = [_finisher(engine, job, limit, streamed=False) for job in jobs]
    listeners = [job.on_text for job in jobs]
    streamer = None
    if any(listeners) and settings.get("num_beams", 1) == 1:  # transformers streams greedy decoding only
        streamer = settings["streamer"] = _RowStreamer([_finisher(engine, job, limit, True) for job in jobs], listeners)
    settings["prefix"] = [job.prefix for job in jobs]
    tokens = _tokens(engine, task, jobs, settings)
    out = []
    for row, (job, finisher) in enumerate(zip(jobs, finishers)):
        for token in tokens[row].tolist():
            finisher.push(token)
            if finisher.finish_reason is not None:
                break
        if finisher.finish_reason is None:  # the output ran out first (beam search may end short of the limit)
            finisher.finish_reason, finisher.text = "length", engine.decode_tokens(finisher.tokens)
        sent = streamer.finishers[row].sent if streamer is not None else ""
        listener = streamer.listeners[row] if streamer is not None else listeners[row]
        if listener is not None and finisher.text.startswith(sent) and len(finisher.text) > len(sent):
            notify(listener, finisher.text[len(sent) :], row)  # the rest of the answer
        read = job.prepared.prompt_tokens if job.prepared is not None else engine.token_count(job.text or "")
        out.append(Completion(finisher.text, finisher.finish_reason, read, len(finisher.tokens)))
    return out


def _finisher(engine: Any, job: Job, limit: int, streamed: bool) -> Finisher:
    return Finisher(engine.decode_tokens, engine.eos, job.setting("stop", ()), limit, streamed)


def _tokens(engine: Any, task: str, jobs: Sequence[Job], settings: dict[str, Any]) -> torch.Tensor:
    """Each row's generated tokens (finished rows padded): from the jobs' prepared inputs, padded into one batch
    as the processor pads a batch, or (models without prepared inputs) through the evaluation's decoding."""
    model, processor = engine.model, engine.processor
    if jobs[0].prepared is None:
        if task == "vqa":
            return decode.answer_tokens(model, processor, [j.image for j in jobs], [j.text for j in jobs], **settings)
        if task == "caption":
            return decode.caption_tokens(model, processor, [j.image for j in jobs], **settings)
        return decode.continuation_tokens(model, engine.tokenizer, [j.text for j in jobs], **settings)
    form = prompt_format(model)
    batch = padded_batch([job.prepared.inputs for job in jobs], engine.pad, left=form.pads_left)
    if "input_ids" not in batch:  # BLIP's captions start from the decoder's own start, as the evaluation's do
        device = batch["pixel_values"].device
        batch.update({k: v.to(device) for k, v in form.decoder_start(model, len(jobs)).items()})
    with torch.no_grad():
        return form.generate(model, processor, task, batch, settings)


class _RowStreamer(BaseStreamer):
    """Hands each row of a batched greedy ``generate`` the new part of its answer at every step."""

    def __init__(self, finishers: Sequence[Finisher], listeners: Sequence[Callable[[str], None] | None]) -> None:
        self.finishers, self.listeners = list(finishers), list(listeners)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt (or the decoder start)
            self._prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.listeners[row] is None:
                continue
            self.finishers[row].push(token)
            piece = self.finishers[row].piece()
            if piece and not notify(self.listeners[row], piece, row):
                self.listeners[row] = None

    def end(self) -> None:
        """The rest of each answer is sent from the whole output (`generate_batch`)."""
