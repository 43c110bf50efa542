"""Parameter-efficient methods side by side: what the recipes train and compare.

``prepare(model, method, options)`` freezes the backbone and makes trainable what the method trains:

* ``prefix``: mmprefix prefixes (``options`` are `PrefixConfig` fields);
* ``prompt``: a soft prompt in the text input (`PrefixConfig(method="prompt")`);
* ``lora``: LoRA from PEFT on the attention projections named in ``LORA_TARGETS``;
* ``full``: every weight (full fine-tuning, the reference the others are measured against).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import PrefixConfig
from ..model import add_prefix

METHODS = ("prefix", "prompt", "lora", "full")

# model_type -> regular expression on module names: the attention projections LoRA adapts (queries and values).
LORA_TARGETS = {
    "blip": r".*\.(query|value|qkv)$",
    "blip-2": r".*\.(query|value|qkv|q_proj|v_proj)$",
    "instructblip": r".*\.(query|value|qkv|q_proj|v_proj)$",
    "clip": r".*\.(q_proj|v_proj)$",
    "gpt2": r".*\.c_attn$",
    "t5": r".*\.(q|v)$",
}
DEFAULT_LORA_TARGET = r".*\.(q_proj|v_proj)$"  # Llama, Mistral, Qwen2, OPT, ...


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

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        options.setdefault("target_modules", LORA_TARGETS.get(model_type, DEFAULT_LORA_TARGET))
        options.setdefault("fan_in_fan_out", model_type == "gpt2")  # GPT-2's Conv1D stores weights transposed
        return get_peft_model(model, LoraConfig(**options))
    if method == "full":
        if options:
            raise ValueError(f"method 'full' takes no options, got {sorted(options)}")
        return model.requires_grad_(True)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def for_generation(model: nn.Module) -> nn.Module:
    """The module to call ``generate`` on: PEFT's wrapper leaves generation to the model it adapted in place."""
    if type(model).__name__.startswith("Peft"):
        return model.get_base_model()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
