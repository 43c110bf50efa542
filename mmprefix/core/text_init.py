"""``PrefixConfig(init="text")``: a prefix that starts as the frozen model's own keys and values for a text
(a soft prompt: as the text's token embeddings).

One forward pass must reach every attention site: the text goes wherever the model takes text, an image
(``init_image``, or a plain grey one) wherever it takes pixels, and the text again as ``labels`` where the
model has decoders that only run with targets (BLIP-VQA's answer decoder, T5's decoder).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from . import routing
from .architectures import family_of, is_open_clip
from .config import PrefixConfig
from .images import BadImageError
from .processors import chat_prompt
from .images import load_image as read_image
from .devices import execution_device
from .families import PER_ROW_IMAGES, Media
from .media import noun_of

GREY = (128, 128, 128)
DEFAULT_MEDIA = (*PER_ROW_IMAGES, Media("input_features", "rows", towers=("audio",)))  # models with no record


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
    # A decoder that reads only targets (VisionEncoderDecoder, Whisper) gets the text as labels from the processor.
    wants_text = "input_ids" in accepted or "labels" in accepted
    media = family.media if (family := family_of(model)) is not None and family.media else DEFAULT_MEDIA
    takes = {noun_of(m) for m in media if m.input in accepted}
    wants_image, wants_audio = "image" in takes, "audio clip" in takes
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if wants_text:
        chat = wants_image and "input_ids" in accepted and getattr(processor, "chat_template", None)
        kwargs["text"] = chat_prompt(processor, text) if chat else text
    if wants_image:
        kwargs["images"] = load_image(image_path)
    if wants_audio:  # one second of faint noise (silence gives some towers all-zero keys), where the text says
        features = getattr(processor, "feature_extractor", None) or getattr(processor, "audio_processor", None)
        kwargs["audio"] = np.random.default_rng(0).normal(0, 1e-2, features.sampling_rate).astype(np.float32)
        marker = getattr(processor, "audio_token", None)
        if wants_text and marker and marker not in kwargs["text"]:
            kwargs["text"] = f"{marker}{kwargs['text']}"
    try:
        inputs = dict(processor(**kwargs))
    except TypeError as err:
        what = " and ".join(w for w, wanted in (("images", wants_image), ("audio", wants_audio), ("text", wants_text)) if wanted)
        raise ValueError(
            f'init="text" on {type(model).__name__} needs a processor that takes {what} '
            f"(got {type(processor).__name__}: {err})"
        ) from None
    inputs = {k: v for k, v in inputs.items() if k in accepted}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and dtype else v for k, v in inputs.items()}
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
    text = text_positions(processor, config.init_text, inputs.get("input_ids"))
    family = family_of(model.base_model) if hasattr(model.base_model, "config") else None
    captured = {}
    for site in store.sites:
        keys, values = call.captured[site.name]
        # Sites take the keys of their first positions. A site that sees the whole text input behind image
        # tokens or a chat template (for GIT also behind the image's own tokens) takes those of the text's own
        # tokens instead: its first positions would be the same for every text.
        offset = keys.shape[1] - inputs["input_ids"].shape[1] if text is not None else -1
        sees_text = offset == 0 or (offset > 0 and family is not None and site.tower in family.image_first)
        if sees_text and int(text[0]) + offset > 1:  # more than a bos or [CLS] token in front
            positions = text + offset
        else:
            positions = torch.arange(keys.shape[1])
        slots = positions[torch.arange(config.num_virtual_tokens) % len(positions)].to(keys.device)
        captured[site.name] = (keys[:, slots], values[:, slots])
    return captured


def text_positions(processor: Any, text: str, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Where ``text``'s tokens are in the first row of ``input_ids`` (None if they are not there in one piece)."""
    if input_ids is None or is_open_clip_processor(processor):
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    words = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"]).flatten().tolist()
    row = input_ids[0].tolist()
    for start in range(len(row) - len(words) + 1):
        if words and row[start : start + len(words)] == words:
            return torch.arange(start, start + len(words))
    return None


def is_open_clip_processor(processor: Any) -> bool:
    return isinstance(processor, (tuple, list))


def text_embeddings(embedding: nn.Module, config: PrefixConfig, processor: Any) -> torch.Tensor:
    """Embeddings of ``init_text``'s tokens, cycled to P: a soft prompt's text initialisation."""
    ids = processor(text=config.init_text, return_tensors="pt")["input_ids"].to(execution_device(embedding) or "cpu")
    with torch.no_grad():
        vectors = embedding(ids)[0]
    return vectors[torch.arange(config.num_virtual_tokens) % vectors.shape[0]].float()
