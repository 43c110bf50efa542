"""``POST /v1/chat/completions``: OpenAI's chat completions on a `PrefixService` (``model`` names the prefix).

A model with a chat template (chat VLMs such as LLaVA, or a tokenizer that has one) gets the whole
conversation through it: system, user and assistant turns, images where the user put them. A model without one
(BLIP, a plain causal LM) reads one user message: an image and text is a visual question, an image alone a
caption request, text alone a continuation. ``n`` choices are ``n`` rows, each sampling from its own seed
(``seed`` for the first, seeds derived from it for the others). Every response carries ``usage``; a stream sends
each choice's text as its tokens are decoded, then ``finish_reason``, then (``stream_options.include_usage``) a
last chunk with ``usage`` and no choices. Fields that cannot be honoured are a 400 (`requests.unsupported`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..data.formats import prompt_format
from .jobs import Job
from .requests import (ApiError, ChatRequest, StreamOptions, chat_inputs, chat_turns, decode_image, error_body,
                       template_messages, unsupported)
from .service import BASE


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request with ``seed``: the seed itself for the first choice (so that
    ``n=1`` and the first of ``n`` agree), a different one for each other."""
    return seed if index == 0 else (seed * 1_000_003 + index) % 2**63


async def chat_completion(api: Any, body: ChatRequest, request: Request) -> Any:
    """The chat completion (a dict) or its event stream; ``api``: the server's endpoints (``server._Api``)."""
    problem = unsupported(body)
    if problem:
        raise ApiError(400, problem)
    if not 1 <= body.n <= api.limits.max_choices:
        raise ApiError(400, f"n={body.n}: this server returns from 1 to {api.limits.max_choices} choices per request")
    jobs = await _jobs(api, body, chat_turns(body.messages))
    header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
              "system_fingerprint": None, "service_tier": "default"}
    if body.stream:
        options = body.stream_options or StreamOptions()
        stream = _Stream(jobs, header, options.include_usage, options.include_obfuscation)
        stream.futures = [await api._submit(job) for job in jobs]
        for index, future in enumerate(stream.futures):
            future.add_done_callback(lambda _, i=index: stream.put((i, stream.ended)))
        return StreamingResponse(stream.events(), media_type="text/event-stream")
    futures = [await api._submit(job) for job in jobs]
    started = time.perf_counter()
    answers = await api._results(request, futures, jobs)
    choices = [{"index": i, "message": {"role": "assistant", "content": str(answer), "refusal": None},
                "logprobs": None, "finish_reason": answer.finish_reason} for i, answer in enumerate(answers)]
    return {**header, "object": "chat.completion", "choices": choices, "usage": usage(answers),
            "latency_ms": round(1000 * (time.perf_counter() - started), 1)}


async def _jobs(api: Any, body: ChatRequest, turns: list) -> list[Job]:
    """One checked job per choice."""
    prefix = None if body.model == BASE else body.model
    messages, images, image, text = (), (), None, None
    if api.service.serves("chat", prefix):
        task, engine = "chat", api._engine("chat", prefix)
        messages, uris = template_messages(turns, parts=prompt_format(engine.model).chat_parts)
        if len(uris) > api.limits.max_images:
            raise ApiError(400, f"the conversation holds {len(uris)} images; this server takes at most {api.limits.max_images}")
        texts = [value for _, parts in turns for kind, value in parts if kind == "text"]
        await run_in_threadpool(api._check_tokens, "chat", texts)
        images = tuple([await run_in_threadpool(decode_image, uri, api.limits) for uri in uris])
    else:
        task, text, image = chat_inputs(turns)
    if body.n > 1 and (body.num_beams or 1) > 1:
        raise ApiError(400, "n > 1 with num_beams: beam search returns one answer per request here")
    settings = api._settings(task, max_new_tokens=body.max_completion_tokens or body.max_tokens,
                             num_beams=body.num_beams, temperature=body.temperature, top_p=body.top_p,
                             seed=body.seed, stop=body.stop)
    first = await api._job(task, body.model, image, text, settings)
    jobs = [first]
    for index in range(1, body.n):
        chosen = dict(settings)
        if "seed" in chosen:
            chosen["seed"] = choice_seed(chosen["seed"], index)
        jobs.append(Job(task, first.prefix, first.image, text, generation=tuple(sorted(chosen.items()))))
    for job in jobs:
        job.messages, job.images = tuple(messages), images
    return jobs


def usage(answers: Sequence[Any]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, the tokens of every choice."""
    prompt, completion = answers[0].prompt_tokens, sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Stream:
    """Server-sent events in OpenAI's chunk format: each choice's role, its pieces as they are decoded (from the
    serving thread, through the event loop), its ``finish_reason``; then the usage chunk if asked; ``[DONE]``.
    Made before the jobs are submitted: their listeners must be in place when their rows start."""

    ended = object()

    def __init__(self, jobs: list[Job], header: dict, include_usage: bool, obfuscate: bool) -> None:
        self.jobs, self.header, self.include_usage, self.obfuscate = jobs, header, include_usage, obfuscate
        self.loop, self.pieces = asyncio.get_running_loop(), asyncio.Queue()
        self.futures: list[Future] = []
        for index, job in enumerate(jobs):
            job.on_text = lambda piece, i=index: self.put((i, piece))

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)
        except RuntimeError:  # the loop closed: the client is gone
            pass

    def chunk(self, choices: list[dict], **extra: Any) -> str:
        none = {"usage": None} if self.include_usage else {}  # OpenAI's chunks say "usage": null until the last
        body = {**self.header, "object": "chat.completion.chunk", "choices": choices, **none, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def delta(self, index: int, content: dict, finish: str | None = None) -> dict:
        out = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        return {**out, "obfuscation": secrets.token_urlsafe(secrets.randbelow(16) + 1)} if self.obfuscate else out

    async def events(self):
        try:
            yield self.chunk([self.delta(i, {"role": "assistant", "content": ""}) for i in range(len(self.jobs))])
            answers, left = [None] * len(self.jobs), len(self.jobs)
            while left:
                index, piece = await self.pieces.get()
                if piece is not self.ended:
                    yield self.chunk([self.delta(index, {"content": piece})])
                    continue
                left -= 1
                try:
                    answers[index] = self.futures[index].result()
                    yield self.chunk([self.delta(index, {}, answers[index].finish_reason)])
                except Exception as error:  # noqa: BLE001 - this choice failed: say so in the stream
                    yield f"data: {json.dumps(error_body(500, failure_message(error), 'server_error'))}\n\n"
            if self.include_usage and all(a is not None for a in answers):
                yield self.chunk([], usage=usage(answers))
            yield "data: [DONE]\n\n"
        finally:  # a client that left: its rows leave their batch at the next step
            for job, future in zip(self.jobs, self.futures):
                future.cancel()
                job.cancelled.set()


def failure_message(error: BaseException) -> str:
    return f"the batch this request ran in failed: {type(error).__name__}: {error}"
