"""Frozen models to serve, from the model specs the recipes use (``mmprefix.models.loading``)."""

from __future__ import annotations

import os
import re
from typing import Any

from torch import nn

from ..models.loading import load_model, offline, task_classes, transformers_config
from ..defaults import DEFAULT_MODEL
from ..embedded import backbone
from ..core.model import PrefixModel
from .engine import Engine

# Tasks tried in turn to pick a transformers class for a model spec; embedded backbones have one task each.
SPEC_TASKS = ("vqa", "caption", "classification", "text")


def share_weights(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` use ``source``'s tensors wherever their state dicts have the same name and shape."""
    theirs = source.state_dict()
    mine = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    target.load_state_dict(shared, strict=False, assign=True)


def load_engines(spec: str = DEFAULT_MODEL, **limits: Any) -> list[Engine]:
    """The engines that serve a model spec: ``embedded:NAME[:HEAD]``, ``open_clip:MODEL[:PRETRAINED]``, a local
    folder or a Hugging Face id. ``embedded:blip`` serves its VQA and captioning heads on shared weights.
    ``limits``: `Engine`'s ``max_new_tokens`` and ``max_beams``."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", spec).strip("-")
    shared = _shared_heads(spec)
    if shared:  # several heads on one set of weights: each head is served, the weights are held once
        heads = [(load_model(f"{spec}:{head}", task), task) for head, task in shared]
        first = heads[0][0][0]
        for (model, _), _ in heads[1:]:
            share_weights(first, model)
        return [Engine(PrefixModel(model), processor, f"{label}-{task}", **limits) for (model, processor), task in heads]
    model, processor = _load(spec)
    return [Engine(PrefixModel(model), processor, label, **limits)]


def _shared_heads(spec: str) -> list[tuple[str, str]]:
    """``embedded:NAME`` of a backbone with several heads: (head, its task) for each; otherwise none."""
    parts = spec.split(":")
    if parts[0] != "embedded" or len(parts) != 2:
        return []
    tasks = backbone(parts[1]).tasks
    return [(head, task) for task, head in tasks.items()] if len(set(tasks.values())) > 1 else []


def _load(spec: str) -> tuple[Any, Any]:
    """A model for the first task its kind is evaluated on (``loading.task_classes``), a causal LM otherwise."""
    if spec.startswith("embedded:"):
        return load_model(spec, next(iter(backbone(spec.split(":")[1]).tasks)))
    if spec.startswith("open_clip:"):
        return load_model(spec, "classification")
    config = transformers_config(spec, os.path.isdir(spec) or offline())
    task = next((t for t in SPEC_TASKS if config.model_type in task_classes(t)), "text")
    return load_model(spec, task)
