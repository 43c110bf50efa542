"""Reading PEFT prefix-tuning adapters, and PEFT's position convention.

PEFT hands the prefix to a causal LM as a KV cache of length ``P``. mmprefix puts the same keys and values
inside attention instead; to give the same logits it must also reproduce what that cache does to positions:
every real token's position id is shifted by ``P`` (``PrefixConfig.position_offset``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import typed
from .architectures import Site, find_sites
from .families import POSITIONS_FROM_MASK
from .config import PrefixConfig
from .files import FLOATS, load_finite, read_json, safetensors_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def is_peft_folder(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


@dataclass
class PeftPrefix:
    """The fields of a PEFT prefix-tuning ``adapter_config.json`` that say what its tensor holds."""

    peft_type: str
    task_type: str | None
    num_virtual_tokens: int
    num_layers: int
    num_attention_heads: int
    token_dim: int
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.peft_type != "PREFIX_TUNING":
            raise ValueError(f"peft_type is {self.peft_type!r}: only PREFIX_TUNING adapters can be loaded")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"task_type is {self.task_type!r}: mmprefix reads CAUSAL_LM prefixes")
        for name in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.token_dim % self.num_attention_heads:
            raise ValueError(f"token_dim {self.token_dim} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")


def read_peft_config(directory: Path) -> PeftPrefix:
    """The adapter's config, every field used checked (PEFT's other fields are left alone)."""
    path = directory / CONFIG_NAME
    data = read_json(path, "a PEFT adapter config (a JSON object)")
    if data.get("peft_type") != "PREFIX_TUNING":  # named first: its other fields are another method's
        raise ValueError(f"{directory} holds a PEFT {data.get('peft_type')} adapter; only PREFIX_TUNING adapters "
                         "can be loaded")
    fields = typed.hints(PeftPrefix)
    required = [name for name in fields if name != "base_model_name_or_path" and name not in data]
    if required:
        raise ValueError(f"{path}: missing {', '.join(required)} (a PEFT prefix-tuning adapter has them)")
    return typed.build(PeftPrefix, {k: data[k] for k in fields if k in data}, str(path))


def read_peft_prefix(
    model: nn.Module, directory: str | os.PathLike
) -> tuple[PrefixConfig, list[Site], dict[str, torch.Tensor]]:
    """A PEFT ``PREFIX_TUNING`` adapter for a causal LM as (config, sites, tensors by site); the config and
    the tensor's shape are checked against each other and the model before the tensor is read."""
    directory = Path(directory)
    config = read_peft_config(directory)
    weights = directory / WEIGHTS_NAME
    _, header = safetensors_header(weights)
    if "prompt_embeddings" not in header:
        raise ValueError(f"{weights}: no 'prompt_embeddings' tensor (it holds {sorted(header)[:5]})")
    if header["prompt_embeddings"][0] not in FLOATS:
        raise ValueError(f"{weights}: prompt_embeddings is {header['prompt_embeddings'][0]}, expected floating point "
                         f"({', '.join(FLOATS)})")
    p, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    expected = (p, layers * 2 * heads * head_dim)
    if header["prompt_embeddings"][1] != expected:
        raise ValueError(f"{weights}: prompt_embeddings has shape {header['prompt_embeddings'][1]}, expected "
                         f"{expected} from {CONFIG_NAME} (num_virtual_tokens x num_layers*2*token_dim)")
    sites = sorted((s for s in find_sites(model) if s.kind == "self"), key=lambda s: s.layer)
    problems = []
    if len(sites) != layers:
        problems.append(f"layers: adapter has {layers}, model has {len(sites)}")
    if sites and (sites[0].kv_heads, sites[0].head_dim) != (heads, head_dim):
        problems.append(
            f"key/value heads x head_dim: adapter {heads}x{head_dim}, model {sites[0].kv_heads}x{sites[0].head_dim}"
        )
    if problems:
        raise ValueError(
            f"the PEFT adapter in {directory} (base model {config.base_model_name_or_path!r}) does not fit "
            f"{type(model).__name__}: " + "; ".join(problems)
        )
    table = load_finite(weights)["prompt_embeddings"]
    # PEFT's get_prompt: view [P, 2L, H, hd], then layer l takes slot 2l as keys and 2l+1 as values.
    slots = table.reshape(p, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
    tensors = {}
    for site in sites:
        tensors[f"{site.name}.key"] = slots[2 * site.layer]
        tensors[f"{site.name}.value"] = slots[2 * site.layer + 1]
    return PrefixConfig(num_virtual_tokens=p, targets=["lm.self"], position_offset=True), sites, tensors


def shifted_positions(model: nn.Module, args: tuple, kwargs: dict[str, Any], offset: int) -> torch.Tensor:
    """The position ids a causal LM would use for this call, shifted as a ``offset``-long KV cache shifts them."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids + offset
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"][..., 0]
    batch, length = inputs.shape[:2]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    if getattr(model.config, "model_type", None) in POSITIONS_FROM_MASK and mask is not None:
        mask = mask.long()
        positions = (mask.cumsum(1) * mask - 1)[:, past:]
        return positions + offset * mask[:, past:]  # padding keeps its position, as under PEFT
    return torch.arange(past + offset, past + offset + length, device=inputs.device).expand(batch, -1)
