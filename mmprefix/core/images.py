"""Open an image the way a vision model expects it: upright, 8-bit RGB, transparency on white.

``PIL.Image.open(path).convert("RGB")`` is silently wrong for several ordinary files (measured with
Pillow 13; tests/data/test_data.py shows each case): EXIF orientation is ignored, transparent areas turn black,
16-bit greyscale is clipped (almost every pixel of a 0..65535 ramp becomes 255), and a truncated JPEG
opens fine and then raises ``OSError`` only when its pixels are read, which kills a DataLoader worker
with no file name. :func:`load_image` fixes these and turns every unreadable file into a
:class:`BadImageError` (policy ``"error"``) or ``None`` (policy ``"skip"``); :class:`ImageLoader`
also remembers what it skipped so that a run can report it.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BadImageError", "ImageLoader", "NoReadableImages", "SkippedImage", "UnreadableImage", "load_image",
           "to_rgb"]

logger = logging.getLogger(__name__)

OnBadImage = Literal["error", "skip"]
ImageSource = Union[str, "os.PathLike[str]", Image.Image, "UnreadableImage"]

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
_BACKGROUND = (255, 255, 255, 255)


class BadImageError(ValueError):
    """An image that cannot be decoded; ``path`` and ``reason`` say which and why.

    A ``ValueError`` rather than an ``OSError`` so that code catching I/O errors for retries does not
    retry a file that will never decode.
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read image {path}: {reason}")


class NoReadableImages(ValueError):
    """Not one image of a dataset could be read: skipping bad images would leave nothing, so this is an error."""

    def __init__(self, count: int, example: str, reason: str):
        super().__init__(f"none of the {count} images could be read (e.g. {example}: {reason}); check the data "
                         "paths and image_root")


@dataclass(frozen=True)
class UnreadableImage:
    """An image a reader found it cannot open (e.g. undecodable bytes in a dataset), kept as a sample's image so
    that loading applies the ``on_bad_image`` policy to it like to any other bad file."""

    name: str
    reason: str


def _describe(source: ImageSource) -> str:
    """A name for error messages: the path, or the file an in-memory image came from."""
    if isinstance(source, UnreadableImage):
        return source.name
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<in-memory image>"
    return os.fspath(source)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale to 8 bits by 1/257 (65535 -> 255, rounded) instead of Pillow's clipping.

    Mode ``I`` (32-bit integer, which is how some readers return 16-bit data) is taken to hold the
    same 0..65535 range; values outside it are clipped.
    """
    values = np.asarray(image, dtype=np.int64)
    values = (np.clip(values, 0, 65535) + 128) // 257
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode "L"


def _has_transparency(image: Image.Image) -> bool:
    """Alpha band, palette with alpha, or a ``transparency`` (tRNS) entry: Pillow >= 10.1 says so."""
    if hasattr(image, "has_transparency_data"):
        return bool(image.has_transparency_data)
    return image.mode in _ALPHA or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new, fully loaded, upright 8-bit RGB copy of ``image``.

    First frame of an animation; EXIF orientation applied; any transparency (alpha band, palette or
    single-colour ``tRNS``) composited on white; 16-bit greyscale scaled by 1/257; CMYK, YCbCr,
    palette, 1-bit and the rest converted by Pillow. May raise ``OSError`` (or other decoder errors)
    for a file that is broken; :func:`load_image` turns those into :class:`BadImageError`.
    """
    if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
        image.seek(0)
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        image = _sixteen_bit_to_l(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")  # also turns palette/L/RGB tRNS into alpha, with no warning
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # always a copy, even for RGB input


def _fresh(image: Image.Image) -> Image.Image:
    """A new handle on a not-yet-decoded in-memory image, so that decoding leaves the original lazy.

    Readers store images embedded in a ``datasets`` dataset as PIL images opened on their bytes, with
    only the header read; decoding that object itself would keep its pixels alive in the sample list
    for the rest of the run.
    """
    stream = getattr(image, "fp", None)
    if isinstance(stream, io.BytesIO) and image.tell() == 0:
        return Image.open(io.BytesIO(stream.getvalue()))
    return image


def _check_policy(on_bad_image: str) -> None:
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")


def _load(source: ImageSource) -> Image.Image:
    """Decode ``source`` or raise :class:`BadImageError`: no ``OSError`` (or decoder bug) gets out."""
    name = _describe(source)
    if isinstance(source, UnreadableImage):
        raise BadImageError(source.name, source.reason)
    try:
        if isinstance(source, Image.Image):
            return to_rgb(_fresh(source))
        with Image.open(source) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(name, "is a directory, not an image file") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.path.getsize(source) == 0:
            reason = "empty file (0 bytes)"
        raise BadImageError(name, reason) from error


def load_image(path_or_image: ImageSource, on_bad_image: OnBadImage = "error") -> Image.Image | None:
    """Open ``path_or_image`` (a path or a PIL image) as upright 8-bit RGB; see :func:`to_rgb`.

    With ``on_bad_image="error"`` an unreadable file (missing, empty, not an image, truncated) raises
    :class:`BadImageError` naming the path and the reason; with ``"skip"`` it is logged and ``None``
    is returned. Use :class:`ImageLoader` to also count what was skipped.
    """
    _check_policy(on_bad_image)
    try:
        return _load(path_or_image)
    except BadImageError as error:
        if on_bad_image == "error":
            raise
        logger.warning("skipping image: %s", error)
        return None


@dataclass
class SkippedImage:
    """One image that :class:`ImageLoader` skipped, and why."""

    path: str
    reason: str


@dataclass
class ImageLoader:
    """:func:`load_image` with a fixed policy that keeps a list of the files it skipped.

    ``loader = ImageLoader(on_bad_image="skip")``; ``loader.load(path)`` (or ``loader(path)``) returns
    an RGB image or ``None``; ``loader.skipped`` lists :class:`SkippedImage` entries for reporting.
    Each DataLoader worker holds its own copy, so counts made inside workers stay there.
    """

    on_bad_image: OnBadImage = "error"
    skipped: list[SkippedImage] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_policy(self.on_bad_image)

    def load(self, path_or_image: ImageSource) -> Image.Image | None:
        """Load one image; on a bad one raise or record it and return ``None``, per the policy."""
        try:
            return _load(path_or_image)
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise
            logger.warning("skipping image: %s", error)
            self.skipped.append(SkippedImage(error.path, error.reason))
            return None

    __call__ = load

    @property
    def num_skipped(self) -> int:
        """How many images were skipped so far."""
        return len(self.skipped)
