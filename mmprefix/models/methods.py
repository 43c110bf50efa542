"""Parameter-efficient methods side by side: what the recipes train and compare.

``prepare(model, method, options)`` freezes the backbone and makes trainable what the method trains:

* ``prefix``: mmprefix prefixes (``options`` are `PrefixConfig` fields);
* ``prompt``: a soft prompt in the text input (`PrefixConfig(method="prompt")`);
* ``memory``: a decoupled prefix, read outside the softmax (`PrefixConfig(method="memory")`);
* ``lora``: LoRA from PEFT on the attention projections the model's family record names;
* ``adapter``: bottleneck adapters after the feed-forward blocks the family record names (`mmprefix.models.adapters`);
* ``full``: every weight (full fine-tuning, the reference the others are measured against).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from . import adapters
from ..core.architectures import family_setting
from ..core.config import PrefixConfig
from ..core.families import DEFAULT_LORA, LORA_BY_LM
from ..core.model import add_prefix, load_prefix
from ..experiment.settings import METHODS


def prepare(model: nn.Module, method: str, options: PrefixConfig | dict[str, Any] | None = None,
            processor: Any = None) -> nn.Module:
    """The model to train with ``method``; ``options`` configure it (a PrefixConfig or its fields, LoraConfig
    fields)."""
    if method in ("prefix", "prompt", "memory"):
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
    if method == "adapter":
        return adapters.add_adapters(model, **options)
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
    return family_setting(model, "lora", LORA_BY_LM, DEFAULT_LORA)


def for_generation(model: nn.Module) -> nn.Module:
    """The module to call ``generate`` on: PEFT's wrapper leaves generation to the model it adapted in place (an
    adapted model, `mmprefix.models.adapters`, is itself that module)."""
    if type(model).__name__.startswith("Peft"):
        return model.get_base_model()
    return model


def load_trained(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """``model`` with what a recipe trained and saved in ``folder`` (its ``prefix/``, ``prompt/``, ``memory/``,
    ``adapter/``, ``lora/`` or ``model/``), ready to evaluate: ``evaluated`` routes it."""
    folder = Path(folder)
    if (folder / "prefix.safetensors").is_file():
        return load_prefix(model, folder)
    if (folder / adapters.CONFIG_NAME).is_file():
        return adapters.load_adapters(model, folder)
    if (folder / "adapter_config.json").is_file():  # PEFT (LoRA)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder)
    if (folder / "config.json").is_file():  # every weight (full fine-tuning)
        return type(model).from_pretrained(folder).eval()
    raise ValueError(f"{folder} holds no trained prefix, adapters, LoRA or model")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
