"""What a request may hold: the JSON bodies of the HTTP API, the limits on them, and turning a chat or an image
into a job's inputs. Errors are `ApiError`: an HTTP status and a one-line message."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..core.images import BadImageError, load_image

CHARS_PER_TOKEN = 16  # far above any tokenizer's average for text (English ~4): it bounds only pathological input


@dataclass
class Limits:
    """What one request may send. Images arrive base64-encoded in JSON, so a body is about 4/3 of its image. A
    text is bounded in characters before it is tokenised (default: ``CHARS_PER_TOKEN`` per allowed token), so that
    one huge word, a single token, cannot hold the tokenizer for seconds."""

    max_body_bytes: int = 16 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_input_tokens: int = 256
    max_classes: int = 256
    max_choices: int = 8  # n of a chat request
    max_images: int = 4  # images in one chat conversation
    max_input_chars: int | None = None

    def __post_init__(self) -> None:
        if self.max_input_chars is None:
            self.max_input_chars = CHARS_PER_TOKEN * self.max_input_tokens
        small = [f"{name}={value}" for name, value in vars(self).items() if value < 1]
        if small:
            raise ValueError(f"limits must be >= 1, got {', '.join(small)}")


class ApiError(Exception):
    """An error answered with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


# -- request bodies ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Generation(_Body):
    prefix: str | None = Field(None, description="prefix name; null or 'base' for the frozen model alone")
    max_new_tokens: int | None = None
    num_beams: int | None = None


class VQARequest(Generation):
    image: str = Field(description="a data: URI or base64 image")
    question: str


class CaptionRequest(Generation):
    image: str


class FeaturesRequest(_Body):
    prefix: str | None = None
    image: str | None = None
    text: str | None = None


class ClassifyRequest(_Body):
    prefix: str | None = None
    image: str
    classnames: list[str] = Field(min_length=1)
    templates: list[str] | None = Field(None, min_length=1, max_length=16)


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    include_obfuscation: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request. Every field of OpenAI's API is known here: the ones this server
    honours, identifiers and hints that change no answer, and the rest, accepted at their neutral values only
    (`unsupported` says why another value is refused). ``num_beams`` is mmprefix's own (beam search)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    num_beams: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # identifiers and hints: accepted, they change no answer
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    # neutral values only (see NEUTRAL)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None


# field -> (its neutral values, why another value cannot be honoured)
NEUTRAL = {
    "frequency_penalty": ((None, 0, 0.0), "penalties are not applied here"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not applied here"),
    "logit_bias": ((None, {}), "logit biases are not applied here"),
    "logprobs": ((None, False), "log probabilities are not returned here"),
    "top_logprobs": ((None, 0), "log probabilities are not returned here"),
    "response_format": ((None, {"type": "text"}), "answers are plain text (no JSON mode or schema)"),
    "tools": ((None, []), "this model does not call tools"),
    "tool_choice": ((None, "none"), "this model does not call tools"),
    "functions": ((None, []), "this model does not call functions"),
    "function_call": ((None, "none"), "this model does not call functions"),
    "store": ((None, False), "this server does not store completions"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
    "modalities": ((None, ["text"]), "this model answers in text only"),
    "audio": ((None,), "this model answers in text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model does not reason before answering"),
    "verbosity": ((None,), "the answer's length is set by max_tokens here"),
    "web_search_options": ((None,), "this server does not search the web"),
    "moderation": ((None,), "this server does not moderate"),
}


def unsupported(body: ChatRequest) -> str | None:
    """Why the request cannot be honoured (an unknown field, or a field at a value this server cannot honour),
    or None."""
    if body.model_extra:
        return f"unknown field {sorted(body.model_extra)[0]!r}"
    for name, (neutral, why) in NEUTRAL.items():
        value = getattr(body, name)
        if not any(value == n and type(value) is type(n) or (value is None and n is None) for n in neutral):
            return f"{name}={json.dumps(value)} cannot be honoured: {why}"
    options = body.stream_options
    if options is not None and (options.model_extra or not body.stream):
        return f"unknown stream option {sorted(options.model_extra)[0]!r}" if options.model_extra else \
            "stream_options needs stream: true"
    return None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class AddPrefix(_Body):
    path: str | None = Field(None, description="a prefix folder; default: <prefix folder>/<name>")


Turn = tuple[str, list[tuple[str, str]]]  # (role, [("text", text) or ("image", data URI), ...])
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_turns(messages: list[Message]) -> list[Turn]:
    """Each message's role and parts (text, images as data URIs), or ApiError for what cannot be honoured."""
    turns = []
    for number, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{number}]: role {message.role!r} is not supported; use "
                                f"{sorted(ROLES)} (this model calls no tools)")
        if message.model_extra:
            raise ApiError(400, f"messages[{number}]: field {sorted(message.model_extra)[0]!r} is not supported")
        content = message.content
        parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else (content or [])
        out = []
        for part in parts:
            if part.type == "text" and part.text:
                out.append(("text", part.text))
            elif part.type == "image_url" and part.image_url is not None:
                if part.image_url.detail not in (None, "auto"):
                    raise ApiError(400, f"messages[{number}]: image detail {part.image_url.detail!r} is not supported: "
                                        "images are read at the model's own resolution (use 'auto')")
                out.append(("image", part.image_url.url))
            elif part.type != "text":
                raise ApiError(400, f"messages[{number}]: content of type {part.type!r} is not supported; send text "
                                    "and image_url parts")
        turns.append((ROLES[message.role], out))
    if not any(role == "user" for role, _ in turns):
        raise ApiError(400, "messages hold no user message")
    return turns


def chat_inputs(turns: list[Turn]) -> tuple[str, str | None, str | None]:
    """(task, text, image) of a model without a chat template: one user message, whose image and text is a
    visual question, image alone a caption request, text alone a continuation (causal LMs)."""
    if len(turns) != 1:
        roles = [role for role, _ in turns]
        raise ApiError(400, f"this model has no chat template: it reads one user message, got the roles {roles}")
    parts = turns[0][1]
    texts = [value for kind, value in parts if kind == "text"]
    images = [value for kind, value in parts if kind == "image"]
    if len(images) > 1:
        raise ApiError(400, f"the message holds {len(images)} images; send one")
    text = " ".join(texts).strip() or None
    image = images[0] if images else None
    if image is None and text is None:
        raise ApiError(400, "the last user message holds neither text nor an image")
    task = ("vqa" if text else "caption") if image is not None else "text"
    return task, text, image


def template_messages(turns: list[Turn], parts: bool) -> tuple[list[dict], list[str]]:
    """The conversation for a chat template and its images (data URIs) in order. ``parts``: contents as lists of
    ``{"type": "image"}`` and ``{"type": "text"}`` parts (vision-language processors), else as one string (text
    tokenizers, which take no images)."""
    messages, images = [], []
    for role, content in turns:
        if parts:
            messages.append({"role": role, "content": [{"type": "image"} if kind == "image" else
                                                       {"type": "text", "text": value} for kind, value in content]})
            images += [value for kind, value in content if kind == "image"]
        elif any(kind == "image" for kind, _ in content):
            raise ApiError(400, "this model reads text only; send no images")
        else:
            messages.append({"role": role, "content": " ".join(value for _, value in content)})
    return messages, images


def decode_image(data: str, limits: Limits) -> Image.Image:
    """An upright RGB image from a ``data:`` URI or bare base64 (400 if it does not decode, 413 over the limits).
    The server never fetches URLs."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "image data URIs must be base64 (data:image/...;base64,...)")
    elif data.split(":", 1)[0].lower() in ("http", "https", "file", "ftp"):
        raise ApiError(400, "images must be sent as data: URIs or base64; this server fetches no URLs")
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, f"the image is over {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image is not valid base64") from None
    try:
        with _opened(raw, limits) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ApiError(413, f"the image is {width}x{height} pixels; this server takes at most "
                                    f"{limits.max_image_pixels} pixels")
            return load_image(image)
    except ApiError:
        raise
    except BadImageError as error:
        raise ApiError(400, f"the image does not decode: {error.reason}") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for bytes that are not an image
        raise ApiError(400, f"the image does not decode: {type(error).__name__}: {error}") from None


def _opened(raw: bytes, limits: Limits) -> Image.Image:
    """Pillow's image of ``raw``; one too large for Pillow to open at all (a decompression bomb) is over the
    pixel limit too: 413, as any image over it."""
    try:
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ApiError(413, f"the image has {pixels[1] if pixels else 'too many'} pixels; this server takes at most "
                            f"{limits.max_image_pixels} pixels") from None
