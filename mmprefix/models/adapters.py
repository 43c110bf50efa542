"""Bottleneck adapters, the smallest honest implementation, as a baseline to compare prefixes with.

Houlsby et al. (2019) insert a bottleneck after the attention and the feed-forward block of every layer; Pfeiffer
et al. (2021) keep only the one after the feed-forward block, with about the same quality. This is the Pfeiffer
placement: the feed-forward block's output projection ``f`` is wrapped so that its output becomes

    y = f(x) + up(relu(down(f(x))))

before the layer's residual addition and norm, with ``down: dim -> width`` and ``up: width -> dim``. ``up`` starts
at zero, so an adapted model starts as the base model exactly. The backbone stays frozen; only the adapters train.

Which modules are the feed-forward output projections is family knowledge (``Family.adapter``, or
``families.ADAPTER_BY_LM`` for plain language models). AdapterHub's ``adapters`` library offers the same
configuration for BERT/ViT/CLIP/GPT-2/Llama/T5 but not for BLIP, and pins transformers ~=4.57 (mmprefix needs
>=5.24), so this module stands in for it. Unlike a prefix, adapters cannot be mixed per row in one batch and do
not merge into the weights (the ReLU sits between ``down`` and ``up``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..core.architectures import family_setting, model_class
from ..core.families import ADAPTER_BY_LM, DEFAULT_ADAPTER

CONFIG_NAME = "bottleneck_config.json"  # not PEFT's adapter_config.json: the two must never be mistaken
WEIGHTS_NAME = "bottleneck.safetensors"


class BottleneckAdapter(nn.Module):
    """A frozen output projection (``nn.Linear``, or GPT-2's ``Conv1D``) followed by a trainable bottleneck."""

    def __init__(self, wrapped: nn.Module, width: int) -> None:
        super().__init__()
        dim = getattr(wrapped, "out_features", None) or getattr(wrapped, "nf", None)
        if not isinstance(dim, int):
            raise ValueError(f"cannot put an adapter after a {type(wrapped).__name__}: it has no output width")
        weight = next(wrapped.parameters())
        self.wrapped = wrapped
        self.down = nn.Linear(dim, width, device=weight.device)
        self.up = nn.Linear(width, dim, device=weight.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped projection's weight: model code reads it (T5 casts its input to ``wo.weight``'s dtype)."""
        return self.wrapped.weight

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.wrapped(*args, **kwargs)
        shift = self.up(F.relu(self.down(out.to(self.down.weight.dtype))))
        return out + shift.to(out.dtype)


def adapter_targets(model: nn.Module) -> str:
    """The feed-forward output projections adapters follow, as a regular expression on module names."""
    return family_setting(model, "adapter", ADAPTER_BY_LM, DEFAULT_ADAPTER)


def add_adapters(model: nn.Module, width: int = 16, targets: str | None = None) -> nn.Module:
    """Freeze ``model`` and put a bottleneck adapter of ``width`` after each feed-forward block (``targets``: a
    regular expression on module names; default: the family's). Returns the model, adapted in place."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"adapter width must be an integer >= 1, got {width!r}")
    if adapters_of(model):
        raise ValueError(f"{model_class(model).__name__} already has adapters")
    targets = targets or adapter_targets(model)
    model.requires_grad_(False)
    names = [name for name, _ in model.named_modules() if re.fullmatch(targets, name)]
    if not names:
        raise ValueError(f"no module of {model_class(model).__name__} matches the adapter targets {targets!r}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, BottleneckAdapter(getattr(owner, child), width))
    model._mmprefix_adapters = {"width": width, "targets": targets}
    return model


def adapters_of(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """The model's adapters by the name of the module they follow."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)}


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> None:
    """The adapters' weights (``bottleneck.safetensors``) and how they were placed (``bottleneck_config.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{part}.{kind}": getattr(getattr(module, part), kind).detach().cpu().contiguous()
               for name, module in adapters_of(model).items() for part in ("down", "up") for kind in ("weight", "bias")}
    save_file(tensors, directory / WEIGHTS_NAME)
    config = {**model._mmprefix_adapters, "architecture": model_class(model).__name__}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``model`` with the adapters saved in ``directory``."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    add_adapters(model, config["width"], config["targets"])
    tensors = load_file(directory / WEIGHTS_NAME)
    expected = {f"{n}.{p}.{k}" for n in adapters_of(model) for p in ("down", "up") for k in ("weight", "bias")}
    if set(tensors) != expected:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds adapters for other modules than {model_class(model).__name__} "
                         f"has (e.g. {sorted(set(tensors) ^ expected)[:2]})")
    with torch.no_grad():
        for name, module in adapters_of(model).items():
            for part in ("down", "up"):
                for kind in ("weight", "bias"):
                    getattr(getattr(module, part), kind).copy_(tensors[f"{name}.{part}.{kind}"])
    return model
