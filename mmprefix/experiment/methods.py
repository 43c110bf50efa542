"""Parameter-efficient methods side by side: what the recipes train and compare.

``prepare(model, method, options)`` freezes the backbone and makes trainable what the method trains:

* ``prefix``: mmprefix prefixes (``options`` are `PrefixConfig` fields);
* ``prompt``: a soft prompt in the text input (`PrefixConfig(method="prompt")`);
* ``lora``: LoRA from PEFT on the attention projections the model's family record names;
* ``full``: every weight (full fine-tuning, the reference the others are measured against).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..architectures import family_of
from ..config import PrefixConfig
from ..families import CAUSAL_LM, DEFAULT_LORA, LORA_BY_LM, SEQ2SEQ_LM
from ..model import add_prefix
from .settings import METHODS



def prepare(model: nn.Module, method: str, options: PrefixConfig | dict[str, Any] | None = None,
            processor: Any = None) -> nn.Module:
    """The model to train with ``method``; ``options`` configure it (a PrefixConfig or its fields, LoraConfig
    fields)."""
    if method in ("prefix", "prompt"):
        if not isinstance(options, PrefixConfig):
            options = PrefixConfig(**{"method": method, **(options or {})})
        if options.method != method:
            raise ValueError(f"method {method!r} was given a PrefixConfig for method {options.method!r}")
        return add_prefix(model, options, processor=processor)
    options = dict(options or {})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        options.setdefault("target_modules", lora_targets(model))
        options.setdefault("fan_in_fan_out", _transposed(model, options["target_modules"]))
        return get_peft_model(model, LoraConfig(**options))
    if method == "full":
        if options:
            raise ValueError(f"method 'full' takes no options, got {sorted(options)}")
        return model.requires_grad_(True)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _transposed(model: nn.Module, targets: str) -> bool:
    """Whether the layers LoRA adapts store their weights transposed (transformers' Conv1D, as in GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    pattern = re.compile(targets)
    return any(isinstance(m, Conv1D) for name, m in model.named_modules() if pattern.fullmatch(name))


def lora_targets(model: nn.Module) -> str:
    """The attention projections LoRA adapts (queries and values), as a regular expression on module names."""
    family = family_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if family is None or family in (CAUSAL_LM, SEQ2SEQ_LM):
        return LORA_BY_LM.get(model_type, DEFAULT_LORA)
    return family.lora


def for_generation(model: nn.Module) -> nn.Module:
    """The module to call ``generate`` on: PEFT's wrapper leaves generation to the model it adapted in place."""
    if type(model).__name__.startswith("Peft"):
        return model.get_base_model()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
