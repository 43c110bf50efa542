"""Inputs for reading a frozen model's own keys and values (``PrefixConfig(init="text")``).

One forward pass must reach every attention site: the text goes wherever the model takes text, an image
(``init_image``, or a plain grey one) wherever it takes pixels, and the text again as ``labels`` where the
model has decoders that only run with targets (BLIP-VQA's answer decoder, T5's decoder).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .data.images import BadImageError
from .data.images import load_image as read_image

GREY = (128, 128, 128)


def load_image(path: str | None, size: int = 224):
    """``init_image``, or a plain grey image when none is given."""
    from PIL import Image

    if path is None:
        return Image.new("RGB", (size, size), GREY)
    try:
        return read_image(path)
    except BadImageError as err:
        raise ValueError(f"cannot read init_image {path!r}: {err.reason}") from None


def activation_inputs(model: nn.Module, processor: Any, text: str, image_path: str | None) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` built with ``processor`` from ``text`` and an image."""
    accepted = inspect.signature(model.forward).parameters
    if "image" in accepted and "text" in accepted:  # open_clip: forward(image, text)
        try:
            tokenizer, transform = processor
        except (TypeError, ValueError):
            raise ValueError(
                'init="text" on open_clip models takes processor=(tokenizer, preprocess), e.g. '
                "(open_clip.get_tokenizer(name), the preprocess of open_clip.create_model_and_transforms(name))"
            ) from None
        return {"image": transform(load_image(image_path)).unsqueeze(0), "text": tokenizer([text])}
    wants_text, wants_image = "input_ids" in accepted, "pixel_values" in accepted
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if wants_text:
        kwargs["text"] = text
    if wants_image:
        kwargs["images"] = load_image(image_path)
    try:
        inputs = dict(processor(**kwargs))
    except TypeError as err:
        what = "images and text" if wants_image and wants_text else "images" if wants_image else "text"
        raise ValueError(
            f'init="text" on {type(model).__name__} needs a processor that takes {what} '
            f"(got {type(processor).__name__}: {err})"
        ) from None
    inputs = {k: v for k, v in inputs.items() if k in accepted}
    if "labels" in accepted and "input_ids" in inputs:
        inputs["labels"] = inputs["input_ids"]
    return inputs
