"""``PrefixConfig(init="text")``: a prefix that starts as the frozen model's own keys and values for a text
(a soft prompt: as the text's token embeddings).

One forward pass must reach every attention site: the text goes wherever the model takes text, an image
(``init_image``, or a plain grey one) wherever it takes pixels, and the text again as ``labels`` where the
model has decoders that only run with targets (BLIP-VQA's answer decoder, T5's decoder).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from . import routing
from .architectures import is_open_clip
from .config import PrefixConfig
from .data.images import BadImageError
from .data.images import load_image as read_image
from .devices import execution_device

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
    if is_open_clip(model):  # forward(image, text)
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


def captured_keys_values(model: Any, store: Any, processor: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen model's own keys and values for ``init_text`` at each of ``store``'s sites, cycled to P.

    ``model`` is a `PrefixModel`: its base model runs once with no prefix while its sites record what they see
    (the first row of the first call at each site)."""
    config = store.config
    inputs = activation_inputs(model.base_model, processor, config.init_text, config.init_image)
    with torch.no_grad(), routing.inside(model, routing.Call(route=None, cache={}, captured={})) as call:
        model.base_model(**inputs)
    missing = [s.name for s in store.sites if s.name not in call.captured]
    if missing:
        raise ValueError(f'init="text" reached no activations at {len(missing)} sites (e.g. {missing[0]})')
    slots = torch.arange(config.num_virtual_tokens)
    return {
        name: (keys[:, slots % keys.shape[1]], values[:, slots % values.shape[1]])
        for name, (keys, values) in call.captured.items()
        if store.has_site(name)
    }


def text_embeddings(embedding: nn.Module, config: PrefixConfig, processor: Any) -> torch.Tensor:
    """Embeddings of ``init_text``'s tokens, cycled to P: a soft prompt's text initialisation."""
    ids = processor(text=config.init_text, return_tensors="pt")["input_ids"].to(execution_device(embedding) or "cpu")
    with torch.no_grad():
        vectors = embedding(ids)[0]
    return vectors[torch.arange(config.num_virtual_tokens) % vectors.shape[0]].float()
