"""What a request may hold: the JSON bodies of the HTTP API, the limits on them, and turning a chat or an image
into a job's inputs. Errors are `ApiError`: an HTTP status and a one-line message."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..data.images import BadImageError, load_image

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


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; sampling fields (temperature, top_p, ...) are accepted and ignored:
    decoding is greedy, or beam search with ``num_beams``."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    num_beams: int | None = None
    n: int = 1


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class AddPrefix(_Body):
    path: str | None = Field(None, description="a prefix folder; default: <prefix folder>/<name>")


def chat_inputs(messages: list[Message]) -> tuple[str, str | None, str | None]:
    """(task, text, image) of a chat: the last user message's text and image (a data: URI). An image and text
    is a visual question, an image alone a caption request, text alone a continuation."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages hold no user message")
    content = users[-1].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else (content or [])
    texts = [p.text for p in parts if p.type == "text" and p.text]
    images = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url is not None]
    if len(images) > 1:
        raise ApiError(400, f"the message holds {len(images)} images; send one")
    text = " ".join(texts).strip() or None
    image = images[0] if images else None
    if image is None and text is None:
        raise ApiError(400, "the last user message holds neither text nor an image")
    task = ("vqa" if text else "caption") if image is not None else "text"
    return task, text, image


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
