"""The HTTP API of a `PrefixService` (FastAPI): OpenAI-compatible chat and embeddings, task endpoints, health,
Prometheus metrics, token-protected prefix administration, and the comparison page at ``/``.

Every error is JSON ``{"error": {"message", "type", "code"}}`` with a one-line message: 400 bad input (an image
that does not decode, too many characters or tokens, an invalid prefix name, a chat field that cannot be honoured),
401/403 admin without the right token, 404 an unknown prefix (the message lists the known ones) or route, 405 a
method the route does not take, 413 a body or image over the limits, 422 malformed JSON (not UTF-8, nested too
deeply) or fields, 500 a batch that failed (only that batch's requests), 503 while shutting down (from the first
SIGTERM until the requests in flight have finished).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .batcher import Closed
from .chat import chat_completion, failure_message, usage
from .engine import Job
from .inputs import ContextTooLong
from .models import DEFAULT_MODEL, load_engines
from .requests import (AddPrefix, ApiError, CaptionRequest, ChatRequest, ClassifyRequest, EmbeddingsRequest,
                       FeaturesRequest, Limits, VQARequest, decode_image, error_body)
from .service import BASE, InvalidName, PrefixService, UnknownPrefix

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page" / "index.html"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status)


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(service: PrefixService, admin_token: str | None = None, limits: Limits | None = None,
               rescan_seconds: float | None = None) -> FastAPI:
    """The FastAPI app serving ``service``. ``admin_token``: enables ``/admin/*`` for requests that send it as a
    bearer token. ``rescan_seconds``: rescan the prefix folder that often. Closing the app (server shutdown)
    finishes every accepted request, then stops the service."""
    limits = limits or Limits()
    api = _Api(service, admin_token, limits)

    async def lifespan(app: FastAPI):
        scanner = asyncio.create_task(_rescan_every(service, rescan_seconds)) if rescan_seconds else None
        yield
        if scanner is not None:
            scanner.cancel()
        await run_in_threadpool(service.close)

    app = FastAPI(title="mmprefix", description="Prefixes served on a frozen model", lifespan=lifespan)
    app.add_middleware(_Guard, limit=limits.max_body_bytes, responses=api.responses)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(HTTPException)(_http_error)
    api.routes(app)
    return app


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _error(error.status, error.message, error.kind)


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return _error(422, f"the body is not valid JSON ({reason}, at character {first['loc'][-1]})")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return _error(422, f"{where + ': ' if where else ''}{first.get('msg')}")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors in this API's shape: an unknown route or method, a body that does not parse."""
    cause, status, kind = error.__cause__, error.status_code, "invalid_request_error"
    if isinstance(cause, UnicodeDecodeError):
        status, message = 422, f"the body is not valid JSON (not UTF-8 text, at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        status, message = 422, "the body is not valid JSON for this server (it nests too deeply)"
    elif status == 404:
        message, kind = f"no endpoint {request.method} {request.url.path} (see /docs)", "not_found_error"
    elif status == 405:
        message = f"{request.url.path} takes {(error.headers or {}).get('Allow', 'other methods')}, not {request.method}"
    else:
        message = str(error.detail)
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=error.headers)


async def _rescan_every(service: PrefixService, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(service.rescan)
        except Exception:  # noqa: BLE001 - a failed scan is logged; the next one may succeed
            logger.exception("rescanning %s failed", service.prefix_dir)


class _Guard:
    """ASGI middleware: reads the body first and refuses one over the limit with 413 (counting the bytes as they
    arrive, whatever the headers say); counts responses by route and status."""

    def __init__(self, app: Any, limit: int, responses: Counter) -> None:
        self.app, self.limit, self.responses = app, limit, responses

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(send)
                return self._count(scope, 413)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, counting_send)
        finally:
            self._count(scope, status["code"])

    async def _too_large(self, send: Any) -> None:
        body = json.dumps(error_body(413, f"the request body is over {self.limit} bytes", "invalid_request_error"))
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})

    def _count(self, scope: dict, code: int) -> None:
        route = scope.get("route")
        self.responses.labels(getattr(route, "path", "unmatched"), str(code)).inc()


class _Api:
    """The endpoints, with what they share: the service, the limits, the admin token."""

    def __init__(self, service: PrefixService, admin_token: str | None, limits: Limits) -> None:
        self.service, self.admin_token, self.limits = service, admin_token, limits
        self.responses = Counter("mmprefix_http_responses", "HTTP responses by route and status", ["route", "status"],
                                 registry=service.metrics.registry)

    def routes(self, app: FastAPI) -> None:
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(self.page)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/v1/models")(self.list_models)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/embeddings")(self.embeddings)
        app.post("/v1/vqa")(self.vqa)
        app.post("/v1/captions")(self.caption)
        app.post("/v1/features")(self.features)
        app.post("/v1/classify")(self.classify)
        # {name:path}: a name holding '/' still reaches the handler, which refuses it with 400
        app.post("/admin/prefixes/{name:path}")(self.add_prefix)
        app.delete("/admin/prefixes/{name:path}")(self.remove_prefix)
        app.post("/admin/rescan")(self.rescan)

    # -- plain endpoints ------------------------------------------------------------------------------------
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self) -> dict:
        queued = {name: batcher.queued for name, batcher in self.service.batchers.items()}
        running = {name: getattr(batcher, "running", 0) for name, batcher in self.service.batchers.items()}
        return {"status": "ok", "models": self.service.models(), "queued": queued, "running": running,
                "batching": self.service.batching_of(), "problems": self.service.problems, "pid": os.getpid()}

    async def metrics(self) -> Response:
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self) -> dict:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "mmprefix", "tasks": tasks}
                for name, tasks in self.service.models().items()]
        return {"object": "list", "data": data}

    # -- tasks ------------------------------------------------------------------------------------------------
    async def vqa(self, body: VQARequest, request: Request) -> dict:
        settings = self._settings("vqa", max_new_tokens=body.max_new_tokens, num_beams=body.num_beams)
        job = await self._job("vqa", body.prefix, body.image, body.question, settings)
        return await self._answer(request, job, "answer")

    async def caption(self, body: CaptionRequest, request: Request) -> dict:
        settings = self._settings("caption", max_new_tokens=body.max_new_tokens, num_beams=body.num_beams)
        job = await self._job("caption", body.prefix, body.image, None, settings)
        return await self._answer(request, job, "caption")

    async def features(self, body: FeaturesRequest, request: Request) -> dict:
        if body.image is None and body.text is None:
            raise ApiError(400, "send an image, a text, or both")
        out, jobs = {"prefix": body.prefix or BASE}, {}
        if body.image is not None:
            jobs["image_features"] = await self._job("image_features", body.prefix, body.image, None)
        if body.text is not None:
            jobs["text_features"] = await self._job("text_features", body.prefix, None, body.text)
        futures = {key: await self._submit(job) for key, job in jobs.items()}
        for key, future in futures.items():
            out[key] = await self._result(request, future)
        return out

    async def classify(self, body: ClassifyRequest, request: Request) -> dict:
        if len(body.classnames) > self.limits.max_classes:
            raise ApiError(400, f"{len(body.classnames)} class names; this server takes at most {self.limits.max_classes}")
        job = await self._job("classify", body.prefix, body.image, None)
        job.classnames = tuple(body.classnames)
        job.templates = tuple(body.templates) if body.templates else job.templates
        texts = {template.format(name) for name in job.classnames for template in job.templates}
        await run_in_threadpool(self._check_tokens, "classify", texts)
        result = await self._result(request, await self._submit(job))
        return {"prefix": body.prefix or BASE, **result}

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        return await chat_completion(self, body, request)

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input is empty")
        jobs = [await self._job("text_features", body.model, None, text) for text in texts]
        futures = [await self._submit(job) for job in jobs]
        vectors = [await self._result(request, future) for future in futures]
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    # -- admin ------------------------------------------------------------------------------------------------
    async def add_prefix(self, name: str, request: Request, body: AddPrefix | None = None) -> dict:
        self._authorize(request)
        folder = body.path if body is not None and body.path else None
        if folder is None:
            if self.service.prefix_dir is None:
                raise ApiError(400, "this server has no prefix folder: send {\"path\": ...}")
            folder = self.service.prefix_dir / name
        try:
            placed = await run_in_threadpool(self.service.add, name, folder)
        except InvalidName as error:
            raise ApiError(400, str(error)) from None
        except (ValueError, OSError) as error:
            raise ApiError(422, f"prefix {name!r} not loaded: {error}") from None
        return {"name": name, "models": placed}

    async def remove_prefix(self, name: str, request: Request) -> dict:
        self._authorize(request)
        try:
            await run_in_threadpool(self.service.remove, name)
        except InvalidName as error:
            raise ApiError(400, str(error)) from None
        except UnknownPrefix as error:
            raise ApiError(404, str(error), "not_found_error") from None
        return {"name": name, "removed": True}

    async def rescan(self, request: Request) -> dict:
        self._authorize(request)
        try:
            return await run_in_threadpool(self.service.rescan)
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    def _authorize(self, request: Request) -> None:
        if self.admin_token is None:
            raise ApiError(403, "admin endpoints are off: start the server with --admin-token", "permission_error")
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {self.admin_token}".encode()):
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error")

    # -- shared -----------------------------------------------------------------------------------------------
    def _settings(self, task: str, **requested: Any) -> dict[str, Any]:
        """Generation settings checked by the engine that serves ``task`` (400 for values it refuses)."""
        try:
            return dict(self._engine(task).settings(**requested))
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    async def _job(self, task: str, prefix: str | None, image: str | None, text: str | None,
                   settings: dict[str, Any] | None = None) -> Job:
        """A checked job: prefix name, token count and image, each with its own error."""
        prefix = None if prefix in (None, BASE) else prefix
        self._engine(task)
        if text is not None:  # tokenised in a worker thread: the event loop keeps accepting other requests
            await run_in_threadpool(self._check_tokens, task, [text])
        decoded = await run_in_threadpool(decode_image, image, self.limits) if image is not None else None
        return Job(task, prefix, decoded, text, generation=tuple(sorted((settings or {}).items())))

    def _engine(self, task: str, prefix: str | None = None) -> Any:
        try:
            return self.service.engine(task, prefix)
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    def _check_tokens(self, task: str, texts: Iterable[str]) -> None:
        """Each text within the limits: characters first (never tokenised when over), then tokens."""
        engine = self._engine(task)
        for text in texts:
            if len(text) > self.limits.max_input_chars:
                raise ApiError(400, f"the text has {len(text)} characters; this server takes at most "
                                    f"{self.limits.max_input_chars}", "context_length_exceeded")
            count = engine.token_count(text)
            if count > self.limits.max_input_tokens:
                raise ApiError(400, f"the text has {count} tokens; this server takes at most "
                                    f"{self.limits.max_input_tokens}", "context_length_exceeded")

    async def _submit(self, job: Job) -> Future:
        """Submit ``job`` from a worker thread (the engine makes its model inputs: tokens, image pixels), so that
        the event loop keeps answering; each refusal with its status."""
        return await run_in_threadpool(self._submit_now, job)

    def _submit_now(self, job: Job) -> Future:
        try:
            return self.service.submit(job)
        except InvalidName as error:
            raise ApiError(400, str(error)) from None
        except UnknownPrefix as error:
            raise ApiError(404, str(error), "not_found_error") from None
        except Closed as error:
            raise ApiError(503, str(error), "server_shutting_down") from None
        except ContextTooLong as error:
            raise ApiError(400, str(error), "context_length_exceeded") from None
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    async def _result(self, request: Request, future: Future, job: Job | None = None) -> Any:
        """The job's result (see `_results`)."""
        return (await self._results(request, [future], [job] if job is not None else []))[0]

    async def _results(self, request: Request, futures: Sequence[Future], jobs: Sequence[Job]) -> list[Any]:
        """The jobs' results; a client that disconnects first cancels them: a job not started yet is dropped, a
        row being decoded leaves its batch at the next step."""
        results = [asyncio.wrap_future(future) for future in futures]
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({asyncio.gather(*results, return_exceptions=True), watcher},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not all(result.done() for result in results):
            for future, job in zip(futures, list(jobs) + [None] * len(futures)):
                future.cancel()
                if job is not None:
                    job.cancelled.set()
            raise ApiError(499, "client closed the request", "client_closed_request")
        return [_unwrap(result) for result in results]

    async def _answer(self, request: Request, job: Job, field: str) -> dict:
        started = time.perf_counter()
        text = await self._result(request, await self._submit(job), job)
        return {field: text, "prefix": job.prefix or BASE, "latency_ms": round(1000 * (time.perf_counter() - started), 1),
                "usage": usage([text])}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. The body has been read, so the server's next message is the disconnect:
    awaited, not polled (polling every request cost the event loop about a tenth of its time under load)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # a server that sends more body messages: wait for the disconnect without spinning


def _unwrap(result: asyncio.Future) -> Any:
    error = result.exception()
    if error is None:
        return result.result()
    if isinstance(error, ApiError):
        raise error
    raise ApiError(500, failure_message(error), "server_error")


def run(models: Sequence[str] = (DEFAULT_MODEL,), prefixes: str | Path | None = "out", host: str = "127.0.0.1",
        port: int = 8000, admin_token: str | None = None, max_batch_size: int = 16, window: float = 0.005,
        rescan_seconds: float | None = None, limits: Limits | None = None, max_new_tokens: int = 64,
        max_beams: int = 4, log_level: str = "info", batching: str = "step") -> None:
    """Load the models, serve the prefixes in ``prefixes`` and answer HTTP on ``host:port`` until SIGINT or
    SIGTERM; then new requests get 503 while the accepted ones finish, and the process exits."""
    import uvicorn

    engines = [engine for spec in models for engine in load_engines(spec, max_new_tokens=max_new_tokens,
                                                                     max_beams=max_beams)]
    service = PrefixService(engines, prefixes, max_batch_size=max_batch_size, window=window, batching=batching)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines", host)
    app = create_app(service, admin_token, limits, rescan_seconds)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    draining_server(config, service).run()


def draining_server(config: Any, service: PrefixService) -> Any:
    """A uvicorn server that, on the first SIGINT or SIGTERM, refuses new requests with 503 and keeps answering
    until the service has finished every request it accepted (rows mid-decode included), then shuts down as
    uvicorn does; a second signal shuts down at once."""
    import uvicorn

    class Draining(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining or self.should_exit:
                return super().handle_exit(sig, frame)
            self.draining = True
            service.drain()
            logger.info("signal %s: new requests get 503 until the accepted ones have finished", sig)
            threading.Thread(target=self._exit_when_idle, args=(sig, frame), daemon=True).start()

        def _exit_when_idle(self, sig: int, frame: Any) -> None:
            while not service.idle and not self.should_exit:
                time.sleep(0.02)
            super().handle_exit(sig, frame)

    return Draining(config)
