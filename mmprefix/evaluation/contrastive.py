"""CLIP-like models (transformers CLIP/SigLIP and open_clip): class embeddings, the classification logits
that training and evaluation share, zero-shot classification and image-text retrieval.

A class is the normalised mean of its templates' unit text embeddings (CLIP's prompt ensembling), and an
image's class logits are cosine similarities to the classes (scaled by the model's logit scale in training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..core.architectures import is_open_clip, unwrap
from ..data import CaptionSample, ImageLoader
from ..data.formatting import class_prompts
from ..core.routing import ACTIVE
from . import metrics
from .batching import chunks, routed, same_length_batches


def class_embeddings(text_features: torch.Tensor, num_templates: int) -> torch.Tensor:
    """``[classes, dim]`` unit class embeddings from the text features of every class's prompts, class by class
    (``[classes * num_templates, dim]``)."""
    text = F.normalize(text_features, dim=-1)
    return F.normalize(text.view(-1, num_templates, text.shape[-1]).mean(1), dim=-1)


def classification_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``[images, classes]`` logits through the model's ``forward`` (so that DDP synchronises gradients): the
    model's logit scale times the cosine similarity of each image with each class, a class being the
    normalised mean of its templates' unit text embeddings, as zero-shot evaluation ranks them."""
    # An image-conditioned prefix reads each image's prompts with that image's shift: every image gets the whole
    # block of prompts (CoCoOp's cost: images x prompts texts), and each image its own class embeddings.
    images = batch["image"] if is_open_clip(model) else batch["pixel_values"]
    copies = images.shape[0] if conditioned(model) else 1
    if is_open_clip(model):  # forward(image, text) -> features and the exponentiated logit scale
        out = model(image=batch["image"], text=batch["text"].repeat(copies, 1))
        image, text, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
            if isinstance(out, dict) else out[:3]
    else:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"].repeat(copies, 1),
                    attention_mask=batch["attention_mask"].repeat(copies, 1))
        image, text = out.image_embeds, out.text_embeds
        scale = unwrap(model).logit_scale.exp()
    classes = class_embeddings(text, batch["num_templates"])
    if copies == 1:
        return scale * F.normalize(image, dim=-1) @ classes.T
    return scale * torch.einsum("bd,bcd->bc", F.normalize(image, dim=-1), classes.view(copies, -1, classes.shape[-1]))


def conditioned(model: Any, prefix: Any = ACTIVE) -> bool:
    """Whether ``model`` (a PrefixModel, possibly inside DDP) routes ``prefix`` to an image-conditioned prefix."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    try:
        check = inner.image_conditioned
    except AttributeError:
        return False
    return bool(check(prefix))


def classification_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of :func:`classification_logits` against the labels (CoOp's objective)."""
    return F.cross_entropy(classification_logits(model, batch), batch["labels"])


class _ClipEncoder:
    """Unit-length image and text embeddings from a transformers CLIP-like model (``get_image_features`` /
    ``get_text_features`` with its processor) or an open_clip model (``encode_image`` / ``encode_text``, with the
    processor ``(tokenizer, preprocess)``)."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.open_clip = is_open_clip(model)
        if self.open_clip and not (isinstance(processor, (tuple, list)) and len(processor) == 2):
            raise ValueError("an open_clip model needs processor=(tokenizer, preprocess)")
        parameter = next(iter(model.parameters()), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        if self.open_clip:
            return torch.stack([self.processor[1](image) for image in images]).to(self.device)
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def images(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = self.pixels(images)
        if self.open_clip:
            return _unit(self.model.encode_image(pixels))
        return _unit(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def texts(self, texts: Sequence[str], copies: int = 1) -> torch.Tensor:
        """Unit text embeddings; ``copies``: the whole list that many times (one per image of a
        `PrefixModel.conditioned_on` scope)."""
        if self.open_clip:
            features = self.model.encode_text(self.processor[0](list(texts)).to(self.device).repeat(copies, 1))
        else:
            inputs = self.processor(text=list(texts), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device).repeat(copies, 1) for k, v in inputs.items()
                      if k in ("input_ids", "attention_mask")}
            features = self.model.get_text_features(**inputs)
        return _unit(features)


def _unit(features: Any) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` holds the projected features."""
    if not torch.is_tensor(features):
        features = features.pooler_output
    return F.normalize(features.float(), dim=-1)


def _encode_texts(encoder: _ClipEncoder, texts: Sequence[str], batch_size: int,
                  prefixes: Sequence[str | None] | None = None) -> torch.Tensor:
    """Text embeddings in the order of ``texts``. transformers processors pad per batch (a left-padding tokenizer
    would shift a text's positions with its batch), so texts are batched by token length; open_clip tokenizers
    pad to a fixed length. ``prefixes``: one prefix name per text, each batch routed by them."""
    if encoder.open_clip:
        batches = list(chunks(list(range(len(texts))), batch_size))
    else:
        tokenizer = getattr(encoder.processor, "tokenizer", encoder.processor)
        lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
        batches = same_length_batches(range(len(texts)), lengths, batch_size)
    features = []
    for batch in batches:
        route = ACTIVE if prefixes is None else [prefixes[i] for i in batch]
        with routed(encoder.model, route):
            features.append(encoder.texts([texts[i] for i in batch]))
    order = torch.tensor([i for batch in batches for i in batch])
    return torch.cat(features)[torch.argsort(order)]


def _encode_images(encoder: _ClipEncoder, sources: Sequence[Any], batch_size: int, loader: ImageLoader,
                   progress: bool, description: str) -> tuple[torch.Tensor | None, list[int], list[dict]]:
    """(embeddings of the readable images, their indices in ``sources``, error rows)."""
    features, kept, errors = [], [], []
    indices = list(range(len(sources)))
    for chunk in tqdm(list(chunks(indices, batch_size)), desc=description, disable=not progress):
        images = []
        for index in chunk:
            image = loader.load(sources[index])
            if image is None:
                skipped = loader.skipped[-1]
                errors.append({"id": index, "image": skipped.path, "reason": skipped.reason})
            else:
                images.append(image)
                kept.append(index)
        if images:
            features.append(encoder.images(images))
    return (torch.cat(features) if features else None), kept, errors


def _conditioned_scores(encoder: _ClipEncoder, sources: Sequence[Any], prompts: list[str], num_templates: int,
                        batch_size: int, loader: ImageLoader, progress: bool) -> tuple[torch.Tensor | None, list, list]:
    """Class scores ``[images, classes]`` of an image-conditioned prefix: each image against class embeddings
    read with its own shift (every prompt once per image), with the readable images' indices and the errors."""
    scores, kept, errors = [], [], []
    per_batch = max(1, batch_size // len(prompts))  # images per text batch of about batch_size rows
    for chunk in tqdm(list(chunks(list(range(len(sources))), per_batch)), desc="classify", disable=not progress):
        images = []
        for index in chunk:
            image = loader.load(sources[index])
            if image is None:
                errors.append({"id": index, "image": loader.skipped[-1].path, "reason": loader.skipped[-1].reason})
            else:
                images.append(image)
                kept.append(index)
        if not images:
            continue
        pixels = encoder.pixels(images)
        features = encoder.images(images)
        with encoder.model.conditioned_on(pixels):
            text = encoder.texts(prompts, copies=len(images))
        classes = class_embeddings(text, num_templates).view(len(images), -1, text.shape[-1])
        scores.append(torch.einsum("bd,bcd->bc", features, classes))
    return (torch.cat(scores) if scores else None), kept, errors


def classify(
    model: Any,
    processor: Any,
    samples: Sequence[tuple[Any, str | int]],
    classnames: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    *,
    prefix: Any = ACTIVE,
    batch_size: int = 64,
    on_bad_image: str = "error",
    errors: list | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot classification accuracy (percent) of a CLIP-like model: ``{"top1", "top5"}``.

    Each class is the normalised mean of its ``templates``' unit text embeddings (CLIP's prompt ensembling);
    an image's scores are cosine similarities. ``samples`` are ``(image path or PIL image, label)`` with the
    label a class name or an index into ``classnames``. ``processor``: the transformers processor, or
    ``(tokenizer, preprocess)`` for open_clip. ``prefix`` routes both towers (see :func:`predict`).
    With ``on_bad_image="skip"`` unreadable images are left out and appended to ``errors``.
    """
    if not samples:
        raise ValueError("classify needs at least one sample")
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted({str(label) for _, label in samples if not isinstance(label, int) and label not in index})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in classnames")
    labels = [label if isinstance(label, int) else index[label] for _, label in samples]
    encoder = _ClipEncoder(model, processor)
    loader = ImageLoader(on_bad_image=on_bad_image)
    prompts = class_prompts(classnames, templates)
    with routed(model, prefix):
        if conditioned(model):  # each image's own class embeddings (CoCoOp)
            scores, kept, bad = _conditioned_scores(encoder, [s[0] for s in samples], prompts, len(templates),
                                                    batch_size, loader, progress)
        else:
            classes = class_embeddings(_encode_texts(encoder, prompts, batch_size), len(templates))
            images, kept, bad = _encode_images(encoder, [s[0] for s in samples], batch_size, loader, progress,
                                               "classify")
            scores = None if images is None else images @ classes.T
    if errors is not None:
        errors += bad
    if scores is None:
        raise ValueError("no readable image to classify")
    accuracy = metrics.topk_accuracy(scores, [labels[i] for i in kept], k=(1, 5))
    return {name: round(100 * value, 2) for name, value in accuracy.items()}


def retrieve(
    model: Any,
    processor: Any,
    caption_samples: Sequence[CaptionSample],
    *,
    prefix: Any = ACTIVE,
    batch_size: int = 64,
    on_bad_image: str = "error",
    errors: list | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Image-text retrieval recall (percent) of a CLIP-like model: ``i2t_R@1/5/10`` and ``t2i_R@1/5/10``.

    Every caption of a sample is a text whose image is that sample's image (``metrics.retrieval_recall``).
    Samples without captions are left out; with ``on_bad_image="skip"`` so are unreadable images (and their
    captions), which are appended to ``errors``.
    """
    samples = [s for s in caption_samples if s.captions]
    if not samples:
        raise ValueError("retrieve needs samples with captions")
    encoder = _ClipEncoder(model, processor)
    loader = ImageLoader(on_bad_image=on_bad_image)
    with routed(model, prefix):
        images, kept, bad = _encode_images(encoder, [s.image for s in samples], batch_size, loader, progress,
                                           "retrieve")
        if images is None:
            raise ValueError("no readable image to retrieve")
        texts = [caption for index in kept for caption in samples[index].captions]
        owner = [row for row, index in enumerate(kept) for _ in samples[index].captions]
        text = _encode_texts(encoder, texts, batch_size)
    if errors is not None:
        errors += [dict(row, id=samples[row["id"]].image_id) for row in bad]
    recall = metrics.retrieval_recall(images @ text.T, owner)
    return {name: round(100 * value, 2) for name, value in recall.items()}
